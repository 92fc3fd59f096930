"""Domain-adaptive self-supervised pre-training (data2vec 2.0 / EAT style) on :mod:`asd.training.fit`.

Objective (:class:`Data2VecObjective`), per batch of B normalised log-mel crops:

* **Teacher**: an EMA copy of the student encoder, eval mode, no gradients, sees the whole
  crop. Targets = the average of its top-K block outputs, each instance-normalised (per
  clip and channel over the patches), then layer-normalised per patch, ``(B, N, D)``.
* **Student**: the same :class:`~asd.models.encoder.AudioEncoder`; each clip is repeated
  ``clone_batch`` times with different masks (``mask_ratio`` of the N patches dropped;
  ``mask_type="block"`` keeps blob-shaped regions: top-k of box-filtered noise on the
  time x frequency patch grid, the inverse-block idea of data2vec 2.0; ``"random"``: i.i.d.).
  The encoder runs on the kept patches only (``forward(mask=...)``).
* **Decoder**: kept outputs are put back on the patch grid, mask positions get a learned
  token, then a linear projection, ``decoder_layers`` grouped 2-D conv blocks (LayerNorm,
  GELU, residual; data2vec 2.0's CNN decoder) and a projection back to D regress the
  teacher targets; MSE at the masked positions only.
* **Utterance loss** (EAT): a linear head on the mean of the student's kept outputs regresses
  the teacher's clip-level target (mean over patches of the averaged, layer-normalised
  targets), MSE, weight
  ``utterance_weight``.
* **EMA**: after every optimizer step ``teacher = d * teacher + (1 - d) * student`` with ``d``
  going linearly from ``ema_start`` to ``ema_end`` over ``ema_anneal_steps`` (default: all
  training steps).

:func:`pretrain` trains with :func:`asd.training.fit.fit`, exports the student (or teacher) encoder to
``<root>/models/<tag>/encoder.pt`` (the pipeline names the serving model, ``models/CURRENT``, once
its recipe is scored).
``init_checkpoint`` starts from a general-purpose encoder (BEATs release format or ours) for
domain adaptation; the encoder architecture then comes from that file.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from asd.io import storage
from asd.models.encoder import AudioEncoder, EncoderConfig, get_config
from asd.models.registry import load_checkpoint
from asd.training.batches import fbank_norm
from asd.training.checkpoints import export_encoder
from asd.training.fit import StageResult, TrainResult, fit, stage_train_config
from asd.training.loop import ObjectiveBase, TrainConfig, ema_update

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    tag: str = "pretrain"  # models/<tag>/encoder.pt; also the Ray Train run name by default
    model: str = "base"  # encoder config name (asd.models.encoder.CONFIGS)
    encoder: dict = field(default_factory=dict)  # EncoderConfig field overrides
    init_checkpoint: str | None = None  # general-purpose start (BEATs or ours); sets the architecture
    mask_ratio: float = 0.8
    mask_type: str = "block"  # block | random
    mask_block: int = 3  # box-filter size (patches) for block masks
    clone_batch: int = 8  # masked copies of every clip
    top_k_layers: int = 8  # teacher blocks averaged into the target (clamped to the depth)
    layer_norm_targets: bool = True  # layer norm of the averaged target (gives the utterance target content)
    ema_start: float = 0.999
    ema_end: float = 0.9999
    ema_anneal_steps: int | None = None  # None: the whole run
    decoder_dim: int = 384
    decoder_layers: int = 4
    decoder_kernel: int = 3
    decoder_groups: int = 16
    utterance_weight: float = 1.0
    export: str = "student"  # student | teacher: which encoder becomes models/<tag>

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_type not in ("block", "random"):
            raise ValueError(f"mask_type must be block or random, got {self.mask_type!r}")
        if self.export not in ("student", "teacher"):
            raise ValueError(f"export must be student or teacher, got {self.export!r}")
        if self.clone_batch < 1 or self.top_k_layers < 1:
            raise ValueError("clone_batch and top_k_layers must be >= 1")


class PretrainResult(StageResult):
    """:class:`asd.training.fit.StageResult` of pre-training."""


# ----------------------------------------------------------------------------- modules


class ConvDecoder(nn.Module):
    """data2vec 2.0's 2-D CNN decoder over the (time, freq) patch grid."""

    def __init__(self, dim: int, decoder_dim: int, layers: int, kernel: int, groups: int):
        super().__init__()
        groups = groups if decoder_dim % groups == 0 else 1
        self.proj_in = nn.Linear(dim, decoder_dim)
        self.blocks = nn.ModuleList(
            nn.Conv2d(decoder_dim, decoder_dim, kernel, padding=kernel // 2, groups=groups) for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(decoder_dim, elementwise_affine=False) for _ in range(layers))
        self.proj_out = nn.Linear(decoder_dim, dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:  # (B, N, D) -> (B, N, D)
        b, n, _ = x.shape
        h = self.proj_in(x).view(b, grid[0], grid[1], -1)  # (B, T', F', C)
        for i, (conv, norm) in enumerate(zip(self.blocks, self.norms)):
            y = conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            y = F.gelu(norm(y))
            h = y if i == 0 else h + y
        return self.proj_out(h.reshape(b, n, -1))


class PretrainModel(nn.Module):
    """Student encoder + decoder + utterance head (what DDP wraps)."""

    def __init__(self, enc_cfg: EncoderConfig, pcfg: PretrainConfig):
        super().__init__()
        self.encoder = AudioEncoder(enc_cfg)
        dim = enc_cfg.encoder_embed_dim
        self.decoder = ConvDecoder(dim, pcfg.decoder_dim, pcfg.decoder_layers, pcfg.decoder_kernel, pcfg.decoder_groups)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.utterance_head = nn.Linear(dim, dim)

    def forward(self, fbank: Tensor, mask: Tensor, clones: int = 1, num_kept: int | None = None) -> tuple[Tensor, Tensor]:
        """Student pass: (B, T, F) crops, (B x clones, N) masks (True = dropped; clone j of clip i
        is row i x clones + j) -> ((B x clones, N, D) predictions on the full grid, (B x clones, D)
        utterance predictions). The front end (patch embedding, projection, positions) runs once
        per clip; only the blocks run once per clone, as in EAT. ``num_kept``: patches every mask row
        keeps, when its maker guarantees it (:func:`kept_count`; else counted on the device)."""
        grid = self.encoder._grid(fbank)
        n = grid[0] * grid[1]
        front, _ = self.encoder.front_end(fbank)
        if clones > 1:
            front = front.repeat_interleave(clones, dim=0)
        index = AudioEncoder.kept_index(mask, n, num_kept)
        kept = self.encoder.from_front_end(front, keep=index)  # (B x clones, N_kept, D)
        full = self.mask_token.to(kept.dtype).expand(kept.shape[0], n, kept.shape[-1]).clone()
        full = full.scatter(1, index[..., None].expand(-1, -1, kept.shape[-1]), kept)
        return self.decoder(full, grid), self.utterance_head(kept.mean(dim=1))


def kept_count(num_patches: int, ratio: float) -> int:
    """Patches every row of :func:`make_mask` keeps."""
    return max(1, int(round(num_patches * (1.0 - ratio))))


def make_mask(batch: int, grid: tuple[int, int], ratio: float, kind: str, block: int, device) -> Tensor:
    """(batch, T'*F') bool, True = dropped; every row keeps :func:`kept_count` patches."""
    t, f = grid
    n = t * f
    keep = kept_count(n, ratio)
    noise = torch.rand(batch, 1, t, f, device=device)
    if kind == "block" and block > 1:
        noise = F.avg_pool2d(noise, block, stride=1, padding=block // 2, count_include_pad=False)[..., :t, :f]
        noise = noise + 1e-4 * torch.rand_like(noise)  # break ties
    idx = noise.flatten(1).topk(keep, dim=1).indices
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, idx, False)
    return mask


def teacher_targets(layers: list[Tensor], k: int, layer_norm: bool = True) -> Tensor:
    """Average of the top-k block outputs, each instance-normalised over patches, then
    (``layer_norm``) layer-normalised per patch, as data2vec 2.0 / EAT: (B, N, D) float32.

    Without the final layer norm every channel of the average has zero mean over the patches,
    and the utterance target (its mean over patches) would be identically zero.
    """
    top = layers[-k:]
    y = sum(F.instance_norm(x.float().transpose(1, 2)).transpose(1, 2) for x in top) / len(top)
    return F.layer_norm(y, y.shape[-1:]) if layer_norm else y


# ----------------------------------------------------------------------------- objective


class Data2VecObjective(ObjectiveBase):
    """The SSL objective plugged into :func:`asd.training.loop.train_loop` (picklable)."""

    name = "data2vec2"
    columns: tuple[str, ...] = ()
    find_unused_parameters = False

    def __init__(self, pcfg: PretrainConfig, encoder_cfg: EncoderConfig | None = None):
        self.pcfg = pcfg
        self.encoder_cfg = encoder_cfg or resolve_encoder_config(pcfg)
        self.teacher: AudioEncoder | None = None
        # the student's layer drop skips other blocks on every rank and step: DDP must look for unused parameters
        self.find_unused_parameters = self.encoder_cfg.encoder_layerdrop > 0

    def __getstate__(self):  # ship config only, never a teacher
        d = dict(self.__dict__)
        d["teacher"] = None
        return d

    def build(self) -> nn.Module:
        return PretrainModel(self.encoder_cfg, self.pcfg)

    def initialize(self, module: nn.Module) -> None:
        if not self.pcfg.init_checkpoint:
            return
        init = load_checkpoint(self.pcfg.init_checkpoint, keep_predictor=False)
        missing, unexpected = module.encoder.load_state_dict(init.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"init checkpoint {self.pcfg.init_checkpoint}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        log.info("student initialised from %s", self.pcfg.init_checkpoint)

    def setup(self, module: nn.Module, device: torch.device) -> None:
        self.teacher = copy.deepcopy(module.encoder).to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def ema_decay(self, step: int, total_steps: int) -> float:
        span = self.pcfg.ema_anneal_steps or total_steps
        if span <= 0 or step >= span:
            return self.pcfg.ema_end
        return self.pcfg.ema_start + (self.pcfg.ema_end - self.pcfg.ema_start) * step / span

    def step(self, model: nn.Module, batch: dict, step: int) -> tuple[Tensor, dict]:
        fbank = batch["fbank"]
        enc = self.teacher
        assert enc is not None, "setup() was not called"
        p = self.encoder_cfg.input_patch_size
        grid = (fbank.shape[1] // p, fbank.shape[2] // p)
        with torch.no_grad():
            layers = enc(fbank, return_all_layers=True)
            target = teacher_targets(layers, min(self.pcfg.top_k_layers, len(layers)), self.pcfg.layer_norm_targets)  # (B, N, D) fp32
            utt_target = target.mean(dim=1)
        c = self.pcfg.clone_batch
        mask = make_mask(fbank.shape[0] * c, grid, self.pcfg.mask_ratio, self.pcfg.mask_type, self.pcfg.mask_block,
                         fbank.device)
        # the front end once per clip, the blocks once per clone; the kept count is known, not counted
        pred, utt = model(fbank, mask, clones=c, num_kept=kept_count(grid[0] * grid[1], self.pcfg.mask_ratio))
        target_c = target.repeat_interleave(c, dim=0)
        # mean squared error over the masked patches, weighted instead of indexed: boolean indexing
        # would wait for the device to count them
        dropped = mask.float()
        per_patch = (pred.float() - target_c).pow(2).mean(dim=-1)
        loss_patch = (per_patch * dropped).sum() / dropped.sum().clamp(min=1.0)
        loss_utt = F.mse_loss(utt.float(), utt_target.repeat_interleave(c, dim=0))
        loss = loss_patch + self.pcfg.utterance_weight * loss_utt
        logs = {"loss_patch": loss_patch.detach(), "loss_utt": loss_utt.detach(),
                "target_std": target.std(dim=0).mean().detach()}
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self, module: nn.Module, step: int, total_steps: int) -> dict:
        d = self.ema_decay(step, total_steps)
        ema_update(self.teacher, module.encoder, d)
        return {"ema_decay": d}

    def state_dict(self) -> dict:
        return {"teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}} if self.teacher else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("teacher") is not None:
            if self.teacher is None:
                raise RuntimeError("load_state_dict before setup()")
            self.teacher.load_state_dict(state["teacher"])

    def encoder(self, module: nn.Module) -> AudioEncoder:
        if self.pcfg.export == "teacher" and self.teacher is not None:
            return self.teacher
        return module.encoder

    def describe(self) -> dict:
        return {"objective": self.name, "pretrain": asdict(self.pcfg)}


def resolve_encoder_config(pcfg: PretrainConfig) -> EncoderConfig:
    """The student's architecture: the init checkpoint's, else ``model``; then ``encoder`` overrides."""
    if pcfg.init_checkpoint:
        cfg = load_checkpoint(pcfg.init_checkpoint, keep_predictor=False).cfg
    else:
        cfg = get_config(pcfg.model)
    return replace(cfg, **dict(pcfg.encoder or {}))


# ----------------------------------------------------------------------------- stage


def pretrain(features_root: str, out_root: str | None = None, pcfg: PretrainConfig | None = None,
             tcfg: TrainConfig | None = None) -> PretrainResult:
    """Pre-train on ``<features_root>/features`` (training split), export to ``<out_root>/models/<tag>``.

    Checkpoints go to ``tcfg.storage_path`` (default ``<out_root>/checkpoints``) under the run
    name ``tcfg.name`` (default: the tag). Rerunning continues from the latest checkpoint
    (``tcfg.resume``).
    """
    pcfg = pcfg or PretrainConfig()
    tcfg = tcfg or TrainConfig()
    out_root = out_root or features_root
    tcfg = stage_train_config(tcfg, pcfg.tag, out_root)
    if pcfg.init_checkpoint:  # read by the Ray workers, whose working directory is not ours
        pcfg = replace(pcfg, init_checkpoint=storage.absolute(pcfg.init_checkpoint))
    t0 = time.perf_counter()
    objective = Data2VecObjective(pcfg)
    norm = fbank_norm(tcfg, features_root)
    res: TrainResult = fit(objective, features_root, tcfg, norm=norm)
    if res.checkpoint is None:
        raise RuntimeError(f"training run {res.run} produced no checkpoint")
    meta = {"stage": "pretrain", "tag": pcfg.tag, "features_root": features_root, "norm_mean": norm[0],
            "norm_std": norm[1], "crop_frames": tcfg.crop_frames, "train_steps": res.step}
    uri = export_encoder(objective, res.checkpoint, out_root, pcfg.tag, meta=meta)
    log.info("pre-trained %s for %d steps (loss %s): %s", pcfg.tag, res.step, res.final_loss, uri)
    return PretrainResult(
        checkpoint=res.checkpoint, run=res.run, encoder=uri, final_loss=res.final_loss,
        steps=res.step, start_step=res.start_step, seconds=time.perf_counter() - t0,
        samples_per_s=res.samples_per_s, train=res.to_dict(history=True),
    )


__all__ = [
    "ConvDecoder",
    "Data2VecObjective",
    "PretrainConfig",
    "PretrainModel",
    "PretrainResult",
    "make_mask",
    "pretrain",
    "resolve_encoder_config",
    "teacher_targets",
]
