from moxin.callbacks.throughput import Throughput
from moxin.callbacks.samples import SampleGenerations
from moxin.callbacks.checkpoint_io import AtomicCheckpointIO

__all__ = ["Throughput", "SampleGenerations", "AtomicCheckpointIO"]
