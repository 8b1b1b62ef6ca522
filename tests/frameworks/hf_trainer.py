"""A tiny Hugging Face Trainer run: a randomly initialised BERT, no download; log_history saved as JSON."""
import json
import sys

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=2))
data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)} for i in range(32)]
args = TrainingArguments(output_dir=sys.argv[1], num_train_epochs=3, per_device_train_batch_size=4,
                         logging_steps=4, eval_strategy="epoch", save_strategy="no", report_to=[],
                         use_cpu=True, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
trainer.train()
with open(sys.argv[2], "w") as f:
    json.dump(trainer.state.log_history, f)
