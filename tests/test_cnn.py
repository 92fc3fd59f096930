"""The CNN encoder: shapes, checkpoints, embedding, and fine-tuning it from scratch through the stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asd.io import storage
from asd.models.cnn import CNNConfig, CNNEncoder
from asd.models.embedders import EncoderEmbedder
from asd.models.encoder import AudioEncoder
from asd.models.registry import load_checkpoint, save_checkpoint

SMALL = CNNConfig(channels=(4, 4, 8, 8), embed_dim=16)


def write_section_labels(root: str) -> str:
    """Labels of the featurized training clips of ``root`` by type and section alone (one pseudo label)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from asd.stores.features import read_features_table

    t = read_features_table(root, columns=["clip_id", "machine_type", "section", "domain", "split"])
    rows = [{"clip_id": r["clip_id"], "machine_type": r["machine_type"], "section": r["section"],
             "domain": r["domain"], "label": None, "pseudo_label": 0, "real_label": None}
            for r in t.filter(pc.field("split") == "train").to_pylist()]
    labels = storage.join(root, "labels", "sections")
    stage = storage.staging_dir(labels)
    storage.write_table(storage.join(stage, "labels.parquet"), pa.Table.from_pylist(rows))
    storage.publish_dir(stage, labels, {"rows": len(rows)})
    return labels


def test_cnn_embeds_any_length_and_keeps_the_frequency_layout():
    torch.manual_seed(0)
    enc = CNNEncoder(SMALL).eval()
    assert SMALL.freq_rows == 16 and enc.min_frames == 8  # 128 -> 64 (stem) -> 32 -> 16
    assert enc.proj.in_features == 8 * 16 * 2  # channels x frequency rows x (mean, max)
    for frames in (8, 37, 200):
        assert enc.embed(torch.randn(3, frames, 128)).shape == (3, 16)
    x = torch.randn(2, 64, 128)
    flipped = x.flip(dims=[2])  # the same frames with the mel axis reversed: another embedding
    assert not torch.allclose(enc.embed(x), enc.embed(flipped), atol=1e-3)
    with pytest.raises(ValueError, match="one embedding"):
        enc.embed(x, pool="freq_meanstd")
    with pytest.raises(ValueError, match="mel bins"):
        enc.embed(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        CNNConfig(channels=(8,))


def test_cnn_checkpoints_round_trip_and_refuse_a_mismatch(tmp_path):
    torch.manual_seed(0)
    enc = CNNEncoder(SMALL)
    enc(torch.randn(4, 32, 128))  # move the batch-norm statistics off their defaults
    enc.eval()
    uri = save_checkpoint(enc, str(tmp_path / "cnn.pt"), meta={"stage": "finetune"})
    back = load_checkpoint(uri)
    assert isinstance(back, CNNEncoder) and back.cfg == SMALL and back.meta == {"stage": "finetune"}
    x = torch.randn(2, 50, 128)
    assert torch.allclose(back.embed(x), enc.embed(x))
    payload = torch.load(uri, weights_only=True)
    assert payload["arch"] == "cnn"
    payload["model"].pop("proj.weight")
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="proj.weight"):
        load_checkpoint(str(tmp_path / "broken.pt"))
    payload["arch"] = "mlp"
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="unknown encoder architecture 'mlp'"):
        load_checkpoint(str(tmp_path / "other.pt"))
    tr = save_checkpoint(AudioEncoder("tiny"), str(tmp_path / "tiny.pt"))  # transformers say so too
    assert torch.load(tr, weights_only=True)["arch"] == "transformer" and isinstance(load_checkpoint(tr), AudioEncoder)


def test_the_encoder_embedder_takes_a_cnn_checkpoint(tmp_path):
    torch.manual_seed(0)
    uri = save_checkpoint(CNNEncoder(SMALL).eval(), str(tmp_path / "cnn.pt"))
    emb = EncoderEmbedder(uri, max_frames=40, device="cpu")
    rng = np.random.default_rng(0)
    clips = [rng.normal(10, 3, (n, 128)).astype(np.float32) for n in (5, 40, 95)]  # shorter than one window: tiled
    out = emb(clips)
    assert out.shape == (3, 16) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    again = EncoderEmbedder(uri, max_frames=40, device="cpu")([clips[2]])
    assert np.allclose(again[0], out[2], atol=1e-5)  # batching does not change a clip's embedding


def test_finetune_config_checks_what_a_cnn_cannot_do():
    from asd.stages.finetune import FinetuneConfig

    FinetuneConfig(model="cnn", model_cfg={"channels": [4, 8], "embed_dim": 8})
    with pytest.raises(ValueError, match="from scratch"):
        FinetuneConfig(model="cnn", init_checkpoint="/x/encoder.pt")
    with pytest.raises(ValueError, match="do not apply"):
        FinetuneConfig(model="cnn", lora_rank=4)
    with pytest.raises(ValueError, match="unknown cnn config keys"):
        FinetuneConfig(model="cnn", model_cfg={"width": 3})
    with pytest.raises(ValueError, match="model must be"):
        FinetuneConfig(model="resnet")


@pytest.mark.slow
def test_a_cnn_trained_from_scratch_learns_the_classes_and_feeds_scoring(small_corpus, ray_session, tmp_path):
    from asd.stages.embed import EmbedConfig, embed
    from asd.stages.featurize import FeaturizeConfig, featurize
    from asd.stages.finetune import FinetuneConfig, finetune
    from asd.stores.embeddings import read_embeddings
    from asd.stores.features import read_features_table
    from asd.training.loop import TrainConfig

    root = str(tmp_path)
    featurize(small_corpus, root, FeaturizeConfig(progress=False))
    t = read_features_table(root, columns=["clip_id", "machine_type", "section", "domain", "split", "attributes"])
    labels = write_section_labels(root)
    fcfg = FinetuneConfig(tag="cnn", model="cnn", model_cfg={"channels": [8, 8, 16, 16], "embed_dim": 32},
                          labels=labels, mixup_prob=0.0)
    tcfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=4, crop_frames=96, log_every=5,
                       num_workers=1, cpus_per_worker=1.0, checkpoint_every=20, bf16=False)
    res = finetune(root, root, fcfg, tcfg)
    assert res.steps == 40 and res.num_classes == 4  # one class per machine type (one section each)
    assert res.final_accuracy > max(0.5, res.first_accuracy), (res.first_accuracy, res.final_accuracy)
    enc = load_checkpoint(res.encoder)
    assert isinstance(enc, CNNEncoder) and enc.meta["init_checkpoint"] is None
    out = embed(root, "cnn", EmbedConfig(embedder="encoder", params={"checkpoint": res.encoder}, num_actors=1,
                                         num_cpus=0.5, progress=False))
    e = read_embeddings(out.embeddings)
    assert e.num_rows == t.num_rows and len(e.column("embedding")[0]) == 32
