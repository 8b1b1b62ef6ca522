"""torch.utils.tensorboard's SummaryWriter: 105 scalars, both the simple_value and the TF2 tensor form."""
import math
import sys

from torch.utils.tensorboard import SummaryWriter

writer = SummaryWriter(sys.argv[1])
for step in range(35):
    writer.add_scalar("Loss/train", 2.0 * math.exp(-step / 10), step)
    writer.add_scalar("Loss/val", 2.1 * math.exp(-step / 12), step)
    writer.add_scalar("lr", 0.1 / (step + 1), step, new_style=True)  # the TF2 tensor form
    writer.flush()
    print(f"step {step} done", flush=True)
writer.close()
