"""A pure-Python stand-in for a noisy training run (no numpy, no torch), for `runpilot plot`.

Logistic regression by minibatch SGD on two overlapping clouds of points: the training loss of
each batch is printed at every step (noisy), the validation loss and accuracy every 25 steps.
"""
import math
import os
import random

STEPS = int(os.environ.get("STEPS", "300"))
LR = float(os.environ.get("LR", "0.2"))
BATCH = int(os.environ.get("BATCH", "32"))

rng = random.Random(0)


def cloud(n):
    points = [((rng.gauss(1.5, 1), rng.gauss(1.5, 1)), 1) for _ in range(n)]
    return points + [((rng.gauss(-1.5, 1), rng.gauss(-1.5, 1)), 0) for _ in range(n)]


train, val = cloud(500), cloud(100)
w, b = [0.0, 0.0], 0.0


def loss_and_hits(data):
    total, hits = 0.0, 0
    for (x1, x2), y in data:
        p = 1 / (1 + math.exp(-(w[0] * x1 + w[1] * x2 + b)))
        total -= math.log(max(p if y else 1 - p, 1e-12))
        hits += (p > 0.5) == bool(y)
    return total / len(data), hits / len(data)


print(f"training for {STEPS} steps, lr={LR}, batch={BATCH}")
for step in range(1, STEPS + 1):
    batch = rng.sample(train, BATCH)
    for (x1, x2), y in batch:
        p = 1 / (1 + math.exp(-(w[0] * x1 + w[1] * x2 + b)))
        w[0] -= LR * (p - y) * x1 / BATCH
        w[1] -= LR * (p - y) * x2 / BATCH
        b -= LR * (p - y) / BATCH
    line = f"METRIC step={step} train_loss={loss_and_hits(batch)[0]:.5f}"
    if step % 25 == 0:
        val_loss, accuracy = loss_and_hits(val)
        line += f" val_loss={val_loss:.5f} val_accuracy={accuracy:.3f}"
    print(line)
print("done")
