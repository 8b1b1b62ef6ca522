"""A small CNN trained on synthetic images: PyTorch only (no torchvision), nothing downloaded.

Each image is noise with a bright square in one of four quadrants; the class is the quadrant. The
images are made in the DataLoader's worker processes, so every batch travels to the trainer through
/dev/shm, as in a real job. Settings come from the environment (the config's `env:`):

  EPOCHS (4)  LR (0.01)  BATCH (16)  IMAGE_SIZE (32)  TRAIN_SIZE (512)  VAL_SIZE (128)
  NUM_WORKERS (2)  SEED (0)

One `METRIC step=EPOCH train_loss=... val_loss=... val_accuracy=...` line per epoch. Batches of
BATCH x 3 x IMAGE_SIZE x IMAGE_SIZE float32 must fit in /dev/shm: BATCH=32 IMAGE_SIZE=512 (~100 MB a
batch) overflows a container's default 64 MB, which `resources.shm_size` raises.
"""
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CLASSES = 4


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class QuadrantImages(Dataset):
    """SIZE images of 3 x SIDE x SIDE; image i is made from seed (SEED, i), so every epoch sees the same data."""

    def __init__(self, size: int, side: int, seed: int):
        self.size, self.side, self.seed = size, side, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(CLASSES, (1,), generator=generator))
        image = torch.randn(3, self.side, self.side, generator=generator)
        half = self.side // 2
        top, left = (label // 2) * half, (label % 2) * half
        image[:, top + half // 4:top + 3 * half // 4, left + half // 4:left + 3 * half // 4] += 0.25
        return image, label


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),  # keeps which quadrant was bright
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, CLASSES),
    )


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return loss_sum / seen, correct / seen


def main() -> None:
    epochs, batch, side = env_int("EPOCHS", 4), env_int("BATCH", 16), env_int("IMAGE_SIZE", 32)
    workers, seed = env_int("NUM_WORKERS", 2), env_int("SEED", 0)
    lr = float(os.environ.get("LR", 0.01))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = os.environ.get("RUNPILOT_MOUNT_DATA", "(no data mount)")
    print(f"torch {torch.__version__} on {device}; data mount at {data_dir} (unused: the images are generated)",
          flush=True)
    print(f"{epochs} epochs, batch {batch} x 3x{side}x{side}, lr={lr}, {workers} loader workers", flush=True)

    torch.manual_seed(seed)
    loader_options = dict(batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda",
                          persistent_workers=workers > 0)
    train = DataLoader(QuadrantImages(env_int("TRAIN_SIZE", 512), side, seed), shuffle=True, **loader_options)
    val = DataLoader(QuadrantImages(env_int("VAL_SIZE", 128), side, seed + 1), **loader_options)
    model = small_cnn().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        model.train()
        loss_sum, seen = 0.0, 0
        for images, labels in train:
            images, labels = images.to(device), labels.to(device)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        val_loss, val_accuracy = evaluate(model, val, device)
        print(f"epoch {epoch}: {time.monotonic() - started:.1f}s", flush=True)
        print(f"METRIC step={epoch} train_loss={loss_sum / seen:.6f} val_loss={val_loss:.6f} "
              f"val_accuracy={val_accuracy:.4f}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
