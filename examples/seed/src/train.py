"""Where the MNIST training script goes; it finds its data at $RUNPILOT_MOUNT_DATA (/mnt/data)."""
import os

data_dir = os.environ.get("RUNPILOT_MOUNT_DATA", "/mnt/data")
print(f"data in {data_dir}: {sorted(os.listdir(data_dir))}")
print("METRIC train_loss=0.5 val_accuracy=0.9")
