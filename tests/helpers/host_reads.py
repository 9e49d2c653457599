"""A dispatch mode that records the ops which make the host wait for a tensor's values (on a GPU: a device sync),
for the tests that hold a code path to reading none."""

from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """`with HostReads() as seen: ...` then `seen.reads`: the names of the value-reading ops that ran, in order."""

    READS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::item")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))
