"""A pure-Python stand-in for a training script (no numpy, no torch).

It fits y = 3x + 1 with gradient descent on a small synthetic data set and prints
one METRIC line per epoch, which RunPilot captures into metrics.json.
"""
import os
import random

EPOCHS = int(os.environ.get("EPOCHS", "8"))
LR = float(os.environ.get("LR", "0.05"))

rng = random.Random(0)
train = [(x, 3 * x + 1 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(200))]
val = [(x, 3 * x + 1) for x in (rng.uniform(-1, 1) for _ in range(50))]
w, b = 0.0, 0.0


def mse(data):
    return sum((w * x + b - y) ** 2 for x, y in data) / len(data)


print(f"training for {EPOCHS} epochs, lr={LR}")
for epoch in range(1, EPOCHS + 1):
    for x, y in train:
        err = w * x + b - y
        w -= LR * err * x
        b -= LR * err
    val_loss = mse(val)
    accuracy = sum(abs(w * x + b - y) < 0.1 for x, y in val) / len(val)
    print(f"epoch {epoch}: w={w:.3f} b={b:.3f}")
    print(f"METRIC step={epoch} train_loss={mse(train):.6f} val_loss={val_loss:.6f} val_accuracy={accuracy:.3f}")
print("done")
