"""Attribute fine-tuning: heads, LoRA, balanced sampling, the loop with and without Ray, resume, scoring."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from asd.io import storage
from asd.models.attribute import EnsembleModel, LoRALinear, add_lora, merge_lora
from asd.models.encoder import AudioEncoder
from asd.models.heads import AdaCos, ArcFace
from asd.models.registry import load_checkpoint, save_checkpoint
from asd.stages.featurize import FeaturizeConfig, featurize
from asd.stages.finetune import AttributeObjective, FinetuneConfig, finetune, load_labels
from asd.stores.features import read_features_table
from asd.training.augment import spec_augment
from asd.training.batches import FeatureBatches, table_batches
from asd.training.fit import train_plain
from asd.training.loop import TrainConfig

# ----------------------------------------------------------------------------- heads and parts


def test_arcface_margin_lowers_only_the_true_logit():
    torch.manual_seed(0)
    head = ArcFace(8, 5, scale=10.0, margin=0.3)
    x = torch.randn(6, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    cos = head(x)
    plain = 10.0 * head.class_cosine(cos)
    logits = head.logits(cos, y)
    true = torch.nn.functional.one_hot(y, 5).bool()
    assert torch.all(logits[true] < plain[true])
    assert torch.allclose(logits[~true], plain[~true])


def test_adacos_scale_adapts_and_subclusters_pool_by_logsumexp():
    torch.manual_seed(0)
    head = AdaCos(8, 4, subclusters=3).train()
    start = float(head.scale)
    assert start == pytest.approx(np.sqrt(2) * np.log(4 * 3 - 1))
    cos = head(torch.randn(32, 8))
    assert cos.shape == (32, 4, 3)
    y = torch.randint(0, 4, (32,))
    loss = head.loss(cos, y)
    assert torch.isfinite(loss) and float(head.scale) != start
    head.eval()
    assert torch.allclose(head.logits(cos, y), torch.logsumexp(head.scale * cos, dim=-1))


def test_mixup_loss_is_the_lam_weighted_sum():
    torch.manual_seed(0)
    head = ArcFace(8, 3).eval()
    cos = head(torch.randn(4, 8))
    ya, yb = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    with torch.no_grad():
        mixed = head.loss(cos, ya, yb, 0.3)
        parts = 0.3 * head.loss(cos, ya) + 0.7 * head.loss(cos, yb)
    assert float(mixed) == pytest.approx(float(parts), rel=1e-5)


def test_lora_starts_as_identity_and_merges_exactly():
    torch.manual_seed(0)
    enc = AudioEncoder("tiny").eval()
    x = torch.randn(2, 64, 128)
    before = enc.embed(x)
    n = add_lora(enc, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    assert n == 2 * len(enc.encoder.layers)
    assert torch.allclose(enc.embed(x), before, atol=1e-6)  # B = 0 at the start
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
    adapted = enc.embed(x)
    assert not torch.allclose(adapted, before, atol=1e-4)
    merged = merge_lora(enc).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(merged.embed(x), adapted, atol=1e-5)
    assert set(merged.state_dict()) == set(AudioEncoder("tiny").state_dict())


def test_spec_augment_masks_bands_with_zeros():
    torch.manual_seed(0)
    cfg = FinetuneConfig(time_masks=1, time_mask_width=10, freq_masks=1, freq_mask_width=8)
    x = torch.ones(16, 100, 128)
    y = spec_augment(x, cfg)
    assert torch.all(x == 1)  # the input is left alone
    zero = y == 0
    assert zero.any() and (~zero).any()
    # every zero lies in a whole zeroed frame row or a whole zeroed bin column of its clip
    rows, cols = zero.all(dim=2), zero.all(dim=1)
    assert torch.equal(zero, rows[:, :, None] | cols[:, None, :])


def test_freeze_layers_and_lora_choose_the_trainable_parameters():
    obj = AttributeObjective(FinetuneConfig(freeze_layers=1), load_cfg(), ["a", "b"], {})
    m = obj.build()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert "encoder.patch_embedding.weight" in frozen and any(n.startswith("encoder.encoder.layers.0.") for n in frozen)
    assert not any(n.startswith("encoder.encoder.layers.1.") for n in frozen) and "head.weight" not in frozen
    lora = AttributeObjective(FinetuneConfig(lora_rank=2), load_cfg(), ["a", "b"], {}).build()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)


def load_cfg():
    return AudioEncoder("tiny").cfg


# ----------------------------------------------------------------------------- labels and sampling


def _labels(root: str, rows: list[dict], name: str = "labels/test") -> str:
    uri = storage.join(root, name)
    stage = storage.staging_dir(uri)
    storage.write_table(storage.join(stage, "labels.parquet"), pa.Table.from_pylist(rows))
    storage.publish_dir(stage, uri, {"rows": len(rows)})
    return uri


def test_balanced_weights_lift_the_rare_target_domain(tmp_path):
    rows = [{"clip_id": f"s{i}", "machine_type": "fan", "section": "00", "domain": "source", "label": "a",
             "pseudo_label": 0, "real_label": None} for i in range(90)]
    rows += [{"clip_id": f"t{i}", "machine_type": "fan", "section": "00", "domain": "target", "label": "b",
              "pseudo_label": 1, "real_label": None} for i in range(10)]
    uri = _labels(str(tmp_path), rows)
    classes, clip_class, weights, summary = load_labels(uri, "label", "class")
    assert classes == ["fan/00/a", "fan/00/b"] and summary["smallest_class"] == 10
    assert np.mean(list(weights.values())) == pytest.approx(1.0)
    assert weights["t0"] / weights["s0"] == pytest.approx(9.0)
    # real_label is null everywhere: one class per type/section, which cannot be trained
    with pytest.raises(ValueError, match="only one class"):
        load_labels(uri, "real_label")


def test_weighted_epochs_sample_in_proportion(tmp_path):
    n = 100
    frames = np.zeros((32, 128), np.float16)
    table = pa.table({
        "clip_id": [f"c{i:03d}" for i in range(n)], "split": ["train"] * n,
        "fbank": [frames.tobytes()] * n, "fbank_dtype": ["float16"] * n,
        "fbank_frames": [32] * n, "num_mel_bins": [128] * n,
    })
    rare = {f"c{i:03d}" for i in range(10)}
    weights = lambda extras: np.array([9.0 if e["clip_id"] in rare else 1.0 for e in extras])  # noqa: E731
    cfg = TrainConfig(batch_size=10, crop_frames=32)
    for cache in (True, False):
        src = FeatureBatches(table_batches(table, cfg), cfg, columns=("clip_id",), cache=cache, weights=weights)
        seen = [c for e in range(20) for b in src.epoch(e) for c in b["clip_id"]]
        share = np.mean([c in rare for c in seen])
        assert 0.4 < share < 0.6, (cache, share)  # 10 * 9 / (10 * 9 + 90) = 0.5; uniform would be 0.1


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def ft_root(small_corpus, ray_session, tmp_path_factory):
    """Features, an (untrained) tiny start encoder and real-attribute labels of the small corpus."""
    root = str(tmp_path_factory.mktemp("finetune_root"))
    featurize(small_corpus, root, FeaturizeConfig(progress=False))
    torch.manual_seed(0)
    save_checkpoint(AudioEncoder("tiny"), storage.join(root, "models", "pretrain", "encoder.pt"))
    t = read_features_table(root, columns=["clip_id", "machine_type", "section", "domain", "split", "attributes"])
    t = t.filter(pc.field("split") == "train")
    rows = []
    for r in t.to_pylist():
        attrs = "|".join(f"{k}={v}" for k, v in (r["attributes"] or [])) or None
        rows.append({"clip_id": r["clip_id"], "machine_type": r["machine_type"], "section": r["section"],
                     "domain": r["domain"], "label": attrs, "pseudo_label": 0, "real_label": attrs})
    _labels(root, rows, "labels/pretrained")
    return root


def _given(root: str) -> dict:
    """The labels and the pre-trained encoder a recipe hands its transformer fine-tuning."""
    return {"labels": storage.join(root, "labels", "pretrained"),
            "init_checkpoint": storage.join(root, "models", "pretrain", "encoder.pt")}


def _objective(root: str, fcfg: FinetuneConfig) -> AttributeObjective:
    classes, clip_class, weights, _ = load_labels(storage.join(root, "labels", "pretrained"), fcfg.label_column)
    init = storage.join(root, "models", "pretrain", "encoder.pt")
    return AttributeObjective(fcfg, load_checkpoint(init).cfg, classes, clip_class, weights, init_checkpoint=init)


def test_loss_falls_and_accuracy_rises_without_ray(ft_root):
    fcfg = FinetuneConfig(head="arcface", scale=16.0, margin=0.2, mixup_prob=0.0)
    tcfg = TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=4, crop_frames=96, log_every=10,
                       torch_threads=2)
    objective = _objective(ft_root, fcfg)
    res = train_plain(objective, ft_root, tcfg)
    losses = [h["loss"] for h in res.history]
    accs = [h["acc"] for h in res.history]
    chance = 1.0 / len(objective.classes)  # ~30 classes of 2-3 clips each, from an untrained encoder
    assert losses[-1] < 0.85 * losses[0], losses
    assert accs[-1] > accs[0] + 0.1 and accs[-1] > 3 * chance, accs


def test_finetune_with_ray_resumes_after_a_killed_worker_and_feeds_scoring(ft_root):
    from asd.stages.embed import EmbedConfig, embed
    from asd.stores.embeddings import read_embeddings

    fcfg = FinetuneConfig(tag="ft", subclusters=2, lora_rank=0, **_given(ft_root))
    tcfg = TrainConfig(steps=12, batch_size=8, crop_frames=96, warmup_steps=2, checkpoint_every=4, num_workers=2,
                       cpus_per_worker=0.5, fail_at_step=6, fail_mode="exit", log_every=2, max_failures=2)
    res = finetune(ft_root, ft_root, fcfg, tcfg)
    assert res.steps == 12 and res.start_step == 4  # resumed from the step-4 checkpoint, not from 0
    assert res.num_classes >= 4 and res.final_accuracy is not None
    enc = load_checkpoint(res.encoder)  # a plain encoder, loaded strictly
    assert enc.meta["stage"] == "finetune" and enc.meta["train_steps"] == 12
    out = embed(ft_root, "ft", EmbedConfig(embedder="encoder", params={"checkpoint": res.encoder}, num_actors=1,
                                           num_cpus=0.5, progress=False))
    e = read_embeddings(out.embeddings)
    assert e.num_rows == read_features_table(ft_root, columns=["clip_id"]).num_rows


def test_lora_finetune_exports_a_merged_strict_encoder(ft_root):
    fcfg = FinetuneConfig(tag="ft_lora", lora_rank=2, head="adacos", **_given(ft_root))
    tcfg = TrainConfig(steps=3, batch_size=8, crop_frames=64, warmup_steps=1, num_workers=1, cpus_per_worker=0.5)
    res = finetune(ft_root, ft_root, fcfg, tcfg)
    start = load_checkpoint(storage.join(ft_root, "models", "pretrain", "encoder.pt"))
    tuned = load_checkpoint(res.encoder)
    s0, s1 = start.state_dict(), tuned.state_dict()
    assert set(s0) == set(s1)
    changed = {k for k in s0 if not torch.equal(s0[k], s1[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)[:5]


def _scratch_cnn(root: str, members: int) -> AttributeObjective:
    fcfg = FinetuneConfig(model="cnn", model_cfg={"channels": [4, 8], "embed_dim": 8}, members=members)
    classes, clip_class, weights, _ = load_labels(storage.join(root, "labels", "pretrained"), fcfg.label_column)
    from asd.models.registry import config_from_dict

    return AttributeObjective(fcfg, config_from_dict("cnn", fcfg.model_cfg), classes, clip_class, weights)


def _scratch_cnn_config(members: int) -> AttributeObjective:
    from asd.models.registry import config_from_dict

    fcfg = FinetuneConfig(model="cnn", model_cfg={"channels": [4, 8], "embed_dim": 8}, members=members)
    return AttributeObjective(fcfg, config_from_dict("cnn", fcfg.model_cfg), ["a", "b"], {"x": 0, "y": 1})


def test_an_ensemble_trains_each_member_on_its_own_share_of_the_batch(ft_root):
    """members=2: one step's batch holds a batch for each member; member i's gradient is exactly the
    gradient of that model trained alone on the i-th half, and the members start differently."""
    import copy

    obj = _scratch_cnn(ft_root, 2)
    obj.fcfg.mixup_prob, obj.fcfg.time_masks, obj.fcfg.freq_masks = 0.0, 0, 0
    torch.manual_seed(0)
    ens = obj.build()
    assert isinstance(ens, EnsembleModel) and len(ens.members) == 2
    w = [m.encoder.stem[0].weight for m in ens.members]  # the first conv of each member
    assert not torch.allclose(w[0], w[1])
    alone = [copy.deepcopy(m) for m in ens.members]
    ids = sorted(obj.clip_class)[:16]
    batch = {"fbank": torch.randn(16, 64, 128), "clip_id": ids}
    loss, logs = obj.step(ens, batch, step=0)
    loss.backward()
    y = torch.tensor([obj.clip_class[c] for c in ids])
    for i, m in enumerate(alone):
        _, cos = m(batch["fbank"][8 * i:8 * (i + 1)])
        m.head.loss(cos.float(), y[8 * i:8 * (i + 1)], None, 1.0).backward()
        for (name, p), q in zip(ens.members[i].named_parameters(), m.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"member {i}: {name}")
    assert 0.0 <= logs["acc"] <= 1.0


def test_each_member_is_clipped_on_its_own():
    from asd.training.loop import clip_gradients

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    assert float(clip_gradients([[a], [b]], 1.0)) == pytest.approx(5.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # a global norm would have shrunk it
    obj = _scratch_cnn_config(2)
    groups = obj.clip_groups(obj.build())
    assert len(groups) == 2 and not {id(p) for p in groups[0]} & {id(p) for p in groups[1]}


def test_an_ensemble_run_exports_one_encoder_per_member(ft_root):
    from asd.models.attribute import member_tag
    from asd.models.cnn import CNNEncoder

    fcfg = FinetuneConfig(tag="ens", model="cnn", model_cfg={"channels": [4, 8], "embed_dim": 8}, members=2,
                          labels=storage.join(ft_root, "labels", "pretrained"))
    tcfg = TrainConfig(steps=2, batch_size=8, crop_frames=64, warmup_steps=1, num_workers=1, cpus_per_worker=0.5,
                       checkpoint_every=2)
    res = finetune(ft_root, ft_root, fcfg, tcfg)
    assert res.encoders == [storage.join(ft_root, "models", t, "encoder.pt") for t in ("ens", "ens-m1")]
    assert res.encoder == res.encoders[0] and member_tag("ens", 1) == "ens-m1"
    encs = [load_checkpoint(u) for u in res.encoders]
    assert all(isinstance(e, CNNEncoder) for e in encs)
    assert [e.meta["member"] for e in encs] == [0, 1] and encs[1].meta["tag"] == "ens-m1"
    x = torch.randn(2, 64, 128)
    assert not torch.allclose(encs[0].eval()(x), encs[1].eval()(x))
    with pytest.raises(ValueError, match="members"):
        FinetuneConfig(members=0)


def test_missing_labels_or_encoder_give_clear_errors(ft_root, tmp_path):
    given = _given(ft_root)
    with pytest.raises(ValueError, match="needs init_checkpoint"):  # no fallback to a path joined by hand
        finetune(ft_root, str(tmp_path), FinetuneConfig(labels=given["labels"]))
    with pytest.raises(FileNotFoundError, match="no encoder to fine-tune"):
        finetune(ft_root, str(tmp_path), FinetuneConfig(labels=given["labels"], init_checkpoint=str(tmp_path / "x.pt")))
    with pytest.raises(ValueError, match="no labels folder"):
        finetune(ft_root, ft_root, FinetuneConfig(init_checkpoint=given["init_checkpoint"]), TrainConfig(steps=1))
    with pytest.raises(Exception, match="labels|_SUCCESS|published|not found"):
        finetune(ft_root, ft_root, FinetuneConfig(**{**given, "labels": str(tmp_path / "nope")}), TrainConfig(steps=1))


def test_paths_for_workers_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("outputs/run/models/pretrain/encoder.pt") == str(tmp_path / "outputs/run/models/pretrain/encoder.pt")
    assert storage.absolute("s3://bucket/models/encoder.pt") == "s3://bucket/models/encoder.pt"


def test_ema_update_averages_parameters_and_batchnorm_statistics():
    from asd.training.loop import ema_update

    torch.manual_seed(0)
    live, avg = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        live.weight.fill_(2.0)
        avg.weight.fill_(1.0)
    live(torch.randn(8, 3) * 3 + 5)  # running statistics and the batch counter move on the live module only
    ema_update(avg, live, 0.9)  # parameters only (the pre-training teacher)
    torch.testing.assert_close(avg.weight, torch.full((3,), 1.1))
    assert torch.equal(avg.running_mean, torch.zeros(3)) and int(avg.num_batches_tracked) == 0
    ema_update(avg, live, 0.9, buffers=True)
    torch.testing.assert_close(avg.weight, torch.full((3,), 0.9 * 1.1 + 0.2))
    torch.testing.assert_close(avg.running_mean, 0.1 * live.running_mean)
    torch.testing.assert_close(avg.running_var, 0.9 + 0.1 * live.running_var)
    assert int(avg.num_batches_tracked) == 1  # counters are copied, not averaged


def test_a_weight_average_run_exports_the_average_of_every_member(ft_root):
    """ema_decay > 0: the exported encoders are the weight averages kept in the checkpoint, not the
    last weights; a checkpoint and a setting that disagree about the average fail instead of exporting."""
    from asd.training.checkpoints import export_encoders, load_state_with_fallback

    fcfg = FinetuneConfig(tag="ema", model="cnn", model_cfg={"channels": [4, 8], "embed_dim": 8}, members=2,
                          ema_decay=0.5, labels=storage.join(ft_root, "labels", "pretrained"))
    tcfg = TrainConfig(steps=4, batch_size=8, crop_frames=64, warmup_steps=1, lr=1e-2, num_workers=1,
                       cpus_per_worker=0.5, checkpoint_every=4)
    res = finetune(ft_root, ft_root, fcfg, tcfg)
    state, _, _ = load_state_with_fallback(res.checkpoint)
    average, last = state["objective"]["average"], state["module"]
    for i, uri in enumerate(res.encoders):
        exported = load_checkpoint(uri).state_dict()
        for k, v in exported.items():
            torch.testing.assert_close(v, average[f"members.{i}.encoder.{k}"], msg=f"member {i}: {k}")
        assert any(not torch.equal(v, last[f"members.{i}.encoder.{k}"]) for k, v in exported.items()
                   if v.is_floating_point())
    objective = AttributeObjective(replace(fcfg, ema_decay=0.0), _scratch_cnn(ft_root, 2).encoder_cfg,
                                   *load_labels(fcfg.labels)[:3])
    with pytest.raises(RuntimeError, match="weight average"):
        export_encoders(objective, res.checkpoint, ft_root, ["x", "x-m1"], [{}, {}])
    with pytest.raises(ValueError, match="ema_decay"):
        FinetuneConfig(ema_decay=1.0)


def test_statistics_exchange_keeps_the_detail_and_takes_the_partners_frame_statistics():
    from asd.training.augment import statistics_exchange

    torch.manual_seed(0)
    x, partner = torch.randn(3, 5, 16) * 2 + 1, torch.randn(3, 5, 16) * 0.5 - 3
    out = statistics_exchange(x, partner)
    torch.testing.assert_close(out.mean(dim=2), partner.mean(dim=2))
    torch.testing.assert_close(out.std(dim=2), partner.std(dim=2), rtol=1e-4, atol=1e-4)
    z = lambda t: (t - t.mean(dim=2, keepdim=True)) / t.std(dim=2, keepdim=True)  # noqa: E731
    torch.testing.assert_close(z(out), z(x), rtol=1e-4, atol=1e-4)


def test_statex_classifies_exchanged_clips_into_the_extra_class_blocks(ft_root):
    """statex_prob > 0: the head has 3 x the classes; the exchanged clips are scored half as their own
    class in the second block and half as their partner's in the third; the others as before."""
    obj = _scratch_cnn(ft_root, 1)
    obj.fcfg.statex_prob, obj.fcfg.mixup_prob = 0.5, 0.0
    c = len(obj.classes)
    torch.manual_seed(0)
    model = obj.build()
    assert model.head.num_classes == 3 * c
    calls = []
    real_loss = model.head.loss
    model.head.loss = lambda cos, y_a, y_b=None, lam=1.0: calls.append((y_a, y_b, lam, cos.shape[0])) or real_loss(
        cos, y_a, y_b, lam)
    ids = sorted(obj.clip_class)[:16]
    loss, logs = obj.step(model, {"fbank": torch.randn(16, 64, 128), "clip_id": ids}, step=0)
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= float(logs["acc"]) <= 1.0
    (own, _, _, k), (ex_a, ex_b, lam, m) = calls
    assert k + m == 16 and 0 < m < 16 and lam == 0.5
    assert bool((own < c).all()) and bool(((ex_a >= c) & (ex_a < 2 * c)).all()) and bool((ex_b >= 2 * c).all())
    y = {obj.clip_class[i] for i in ids}
    assert {int(v) - c for v in ex_a} <= y and {int(v) - 2 * c for v in ex_b} <= y
    with pytest.raises(ValueError, match="statex_prob"):
        FinetuneConfig(statex_prob=1.0)
