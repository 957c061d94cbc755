"""torch_lamb.Lamb with the Hugging Face ``transformers.Trainer``: a tiny BERT built from a config
(no hub download), trained on a synthetic token-classification task, EMA weights finalized at the end.

    HF_HUB_OFFLINE=1 python examples/hf_trainer.py --steps 60
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from torch_lamb import Lamb
from torch_lamb.integrations.huggingface import LambCallback

VOCAB, LENGTH = 64, 12


class Synthetic(torch.utils.data.Dataset):
    """Label 1 when token 7 appears in the sequence (learnable by a 1-layer transformer)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, VOCAB, (n, LENGTH), generator=g)
        plant = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(1, LENGTH, (n,), generator=g)
        self.ids[plant, pos[plant]] = 7
        self.ids[:, 0] = 2  # a [CLS]-like first token
        self.labels = plant.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def accuracy(model: torch.nn.Module, data: Synthetic) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data.ids).logits
    return (logits.argmax(-1) == data.labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--steps", type=int, default=100, help="optimizer updates (Trainer max_steps)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--accum", type=int, default=2, help="Trainer gradient_accumulation_steps")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Trainer output_dir (a temporary folder when omitted)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=LENGTH, num_labels=2,
    )
    model = BertForSequenceClassification(config)
    train, test = Synthetic(4096, args.seed), Synthetic(512, args.seed + 1)

    opt = Lamb(model.named_parameters(), learning_rate=args.lr, weight_decay=0.01, use_ema=True, ema_momentum=0.9)
    opt.exclude_from_weight_decay(var_names=["bias", "LayerNorm"])
    callback = LambCallback(opt, log_trust_ratios=True)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=args.out or tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accum, warmup_steps=max(1, args.steps // 10),
            lr_scheduler_type="linear", logging_steps=max(1, args.steps // 3), save_strategy="no",
            report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
        )
        before = accuracy(model, test)
        trainer = Trainer(model=model, args=targs, train_dataset=train, optimizers=(opt, None), callbacks=[callback])
        trainer.train()  # LambCallback.on_train_end copies the EMA weights into the model
    after = accuracy(model, test)
    trust_logs = [h for h in trainer.state.log_history if any(k.startswith("trust_ratio/") for k in h)]
    print(f"test accuracy: before {before:.3f}, after (EMA weights) {after:.3f}; updates {opt.iterations}")
    if trust_logs:
        last = {k: round(v, 4) for k, v in trust_logs[-1].items() if k.startswith("trust_ratio/")}
        print(f"last logged trust ratios: {dict(list(last.items())[:4])} ...")
    return {"before": before, "after": after, "iterations": float(opt.iterations),
            "finalized": float(callback.finalized), "trust_logs": float(len(trust_logs))}


if __name__ == "__main__":
    main()
