"""Hugging Face ``transformers.Trainer`` support.

Pass a :class:`~torch_lamb.Lamb` through ``Trainer(optimizers=(opt, None))`` (the Trainer then builds
its usual learning-rate scheduler around it) and add :class:`LambCallback` so that the EMA weights are
copied into the model when training ends and, optionally, the trust ratios are logged::

    from torch_lamb.integrations.huggingface import LambCallback

    opt = Lamb(model.named_parameters(), learning_rate=1e-3, weight_decay=0.01, use_ema=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                      callbacks=[LambCallback(opt, log_trust_ratios=True)])
    trainer.train()   # on_train_end: opt.finalize_variable_values()
    trainer.save_model()

Do not also set ``gradient_accumulation_steps`` on the Lamb: the Trainer accumulates itself and calls
``optimizer.step()`` once per update.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "torch_lamb.integrations.huggingface needs `transformers` (pip install transformers)."
    ) from err

from ..optimizer import Lamb
from ..telemetry import trust_ratio_table

__all__ = ["LambCallback", "unwrap_lamb"]


def unwrap_lamb(optimizer: Any) -> Lamb | None:
    """The :class:`Lamb` inside an optimizer wrapper (accelerate's ``AcceleratedOptimizer``), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, Lamb) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, Lamb) else None


class LambCallback(TrainerCallback):
    """Finalize EMA weights at the end of training and optionally log trust ratios.

    Args:
        optimizer: the :class:`Lamb` given to the Trainer (found from the Trainer's optimizer when None).
        finalize: call ``finalize_variable_values()`` in ``on_train_end`` (a no-op without ``use_ema``).
        log_trust_ratios: add ``trust_ratio/<param name>`` to every Trainer log (one host sync per log).
    """

    def __init__(self, optimizer: Lamb | None = None, *, finalize: bool = True, log_trust_ratios: bool = False):
        self.optimizer = optimizer
        self.finalize = finalize
        self.log_trust_ratios = log_trust_ratios
        self.finalized = False

    def _lamb(self, kwargs: dict[str, Any]) -> Lamb | None:
        return self.optimizer if self.optimizer is not None else unwrap_lamb(kwargs.get("optimizer"))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = self._lamb(kwargs)
        if self.log_trust_ratios and opt is not None:
            opt.track_trust_ratios(True)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        opt = self._lamb(kwargs)
        if not self.log_trust_ratios or opt is None or logs is None or not opt.tracking_trust_ratios:
            return
        for name, (ratio, _, _) in trust_ratio_table(opt.last_trust_ratios()).items():
            logs[f"trust_ratio/{name}"] = ratio
        if state is not None and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: v for k, v in logs.items() if k.startswith("trust_ratio/")})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = self._lamb(kwargs)
        if self.finalize and opt is not None:
            opt.finalize_variable_values()
            self.finalized = True
