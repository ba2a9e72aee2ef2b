"""``mimkit`` under torchrun for tests/test_ddp.py; with MIMKIT_TEST_SUM_GRADS=1 DDP sums gradients over processes
instead of averaging them (the mutation the DDP test must catch), through a DDP communication hook."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("MIMKIT_TEST_SUM_GRADS") == "1":
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    def _sum(state, bucket):  # DDP's default hook divides by the world size; this one does not
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    _init = DistributedDataParallel.__init__

    def _init_summing(self, *a, **k):
        _init(self, *a, **k)
        self.register_comm_hook(None, _sum)

    DistributedDataParallel.__init__ = _init_summing

from mimkit.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
