from moxin.callbacks.throughput import Throughput
from moxin.callbacks.samples import SampleGenerations

__all__ = ["Throughput", "SampleGenerations"]
