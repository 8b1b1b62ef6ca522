"""A Keras 3 fit on the torch backend (KERAS_BACKEND=torch); its History saved as JSON."""
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
import keras
import numpy as np

keras.utils.set_random_seed(0)
x = np.random.rand(256, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("int32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(2, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
history = model.fit(x, y, epochs=3, batch_size=32, validation_split=0.25, verbose=int(sys.argv[2]))
model.evaluate(x, y, verbose=int(sys.argv[2]))
with open(sys.argv[1], "w") as f:
    json.dump(history.history, f)
