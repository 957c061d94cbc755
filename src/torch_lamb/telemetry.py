"""Opt-in trust-ratio telemetry: the last update's per-parameter ``||w||``, ``||u||`` and ratio.

Off by default. When off, :meth:`Lamb.step` does no extra work at all. When on, the optimizer keeps
a reference to the 1-D device tensors that the update already produced (no copy, no host sync);
they are converted to Python numbers only when *you* ask (``float(...)``, ``.tolist()``).

Nothing here enters ``state_dict()`` or pickles: telemetry is not optimizer state. Under gradient
accumulation the micro-steps that do not update keep the values of the last real update. With
``skip_nonfinite=True`` a skipped call still runs the update arithmetic (with factors that leave the
weights unchanged), and the values recorded for it are the ones that arithmetic produced.

Example::

    opt = Lamb(model.named_parameters(), learning_rate=1e-3)
    opt.track_trust_ratios(True)
    ...
    opt.step()
    for name, rec in opt.last_trust_ratios().items():
        print(name, float(rec.ratio), float(rec.weight_norm), float(rec.update_norm))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .functional import TrustStats

__all__ = ["TrustRatio", "TrustRatioTelemetry", "trust_ratio_table"]


class TrustRatio(NamedTuple):
    """One parameter's trust ratio and the two norms it came from (0-dim tensors, on device)."""

    ratio: Tensor
    weight_norm: Tensor
    update_norm: Tensor


class _Recorder:
    """The stats of the buckets of the latest update (references, not copies)."""

    __slots__ = ("buckets", "step")

    def __init__(self) -> None:
        self.step: int | None = None  # raw micro-step counter of the recorded update
        self.buckets: list[tuple[list[str | None], TrustStats]] = []

    def record(self, step: int, names: list[str | None], stats: TrustStats) -> None:
        if step != self.step:  # first bucket of a new update: forget the previous one
            self.step = step
            self.buckets = []
        self.buckets.append((list(names), stats))


class TrustRatioTelemetry:
    """Mixin that gives an optimizer ``track_trust_ratios`` / ``last_trust_ratios``.

    The optimizer hands each update's per-bucket stats to :meth:`_record_trust_stats`; this mixin records
    them only while tracking is on.
    """

    _trust_recorder: _Recorder | None = None

    def track_trust_ratios(self, enabled: bool = True) -> None:
        """Start (``True``) or stop (``False``) recording the trust ratios of each update.

        Stopping also forgets the last recorded values.
        """
        if not isinstance(enabled, bool):
            raise ValueError(f"`enabled` must be a bool. Received: enabled={enabled!r}")
        if enabled:
            if self._trust_recorder is None:
                self._trust_recorder = _Recorder()
        else:
            self._trust_recorder = None

    @property
    def tracking_trust_ratios(self) -> bool:
        """Whether trust ratios are being recorded."""
        return self._trust_recorder is not None

    def _record_trust_stats(self, step: int, records: list[tuple[list[str | None], TrustStats]]) -> None:
        """Keep the stats of the update of call ``step`` (references: no copy, no sync)."""
        rec = self._trust_recorder
        if rec is not None:
            for names, stats in records:
                rec.record(step, names, stats)

    def last_trust_ratios(self) -> dict[str, TrustRatio]:
        """``{param name: TrustRatio(ratio, weight_norm, update_norm)}`` of the latest update.

        Names come from ``model.named_parameters()`` when the optimizer was given them, else
        ``"<group index>.<param index>"``. The tensors live on the parameters' devices; reading them
        (``float()``) is the only host sync. Empty before the first update.

        Raises:
            RuntimeError: when tracking is off (call ``track_trust_ratios(True)`` first).
        """
        rec = self._trust_recorder
        if rec is None:
            raise RuntimeError("Trust-ratio tracking is off: call `optimizer.track_trust_ratios(True)` first.")
        out: dict[str, TrustRatio] = {}
        for names, stats in rec.buckets:
            for i, name in enumerate(names):
                if name is None:  # a shard's placeholder entry (it holds no whole trust-ratio slice)
                    continue
                out[name] = TrustRatio(stats.trust_ratio[i], stats.weight_norm[i], stats.update_norm[i])
        return out


def trust_ratio_table(records: dict[str, TrustRatio]) -> dict[str, tuple[float, float, float]]:
    """``{name: (ratio, ||w||, ||u||)}`` as Python floats, with one host sync for all of them."""
    if not records:
        return {}
    names = list(records)
    device = records[names[0]].ratio.device
    packed = torch.stack([torch.stack([t.float().to(device) for t in records[n]]) for n in names]).cpu()
    rows: Any = packed.tolist()
    return {n: (r[0], r[1], r[2]) for n, r in zip(names, rows)}
