"""What a run of several recipes reports: the pipeline's side-by-side table of its scored recipes
(:func:`write_comparison`, ``scores/comparison.{md,png}``) and an evaluation's report
(:func:`write_evaluation_report`, ``evaluate/report.{md,json,png}``): data and split checksums,
the official score and per-type scores of every method, how each was trained, and how its pseudo
labels agree with the real attributes."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from asd.io import layout, storage
from asd.recipes.split import EXCLUDED, TEST, TRAIN, data_sha256
from asd.reports import metrics, plots, tables

log = logging.getLogger(__name__)


def _pct(v) -> str:
    text = tables.pct(v)
    return text if text == "n/a" else f"{text} %"


# ----------------------------------------------------------------------------- the pipeline's table


def write_comparison(root: str, scored: dict, skipped: dict[str, str], served: str) -> dict:
    """Print every scored recipe's report and a side-by-side table; write it as
    ``scores/comparison.{md,png}``. ``scored``: recipe -> :class:`asd.stages.score.ScoreResult`.
    The served recipe leads: its report is printed last (nearest the summary), its column comes
    first, and the headline ``official_score`` and ``report`` are its own."""
    order = [n for n in sorted(scored, key=lambda n: n != served) if scored[n].report]
    for name in order[1:] + order[:1]:
        print("\n" + storage.read_text(scored[name].report), flush=True)
    results = {n: metrics.evaluate_table(storage.read_table(storage.join(scored[n].scores, "scores.parquet")))
               for n in order}
    out: dict = {"reports": {n: scored[n].report for n in order},
                 "official_scores": {n: scored[n].official_score for n in order}}
    if not results:
        return out
    table = tables.methods_markdown(results)
    notes = "".join(f"\n- **{name}** is missing: {why}" for name, why in skipped.items())
    md = storage.atomic_write_text(layout.comparison_uri(root, "md"), "# Official DCASE score per recipe (kNN)\n\n"
                                   + table + "\n" + notes + ("\n" if notes else ""))
    plots.plot_method_bars(layout.comparison_uri(root, "png"), results)
    print("\n" + table, flush=True)
    for name, uri in out["reports"].items():
        print(f"report ({name}): {uri}", flush=True)
    print(f"comparison: {md}", flush=True)
    head = order[0]
    out.update(comparison=md, report=out["reports"][head], official_score=out["official_scores"][head],
               served={"recipe": head, "official_score": out["official_scores"][head], "report": out["reports"][head]})
    others = ", ".join(f"{n} {100 * v:.2f} %" for n, v in out["official_scores"].items() if n != head and v is not None)
    print(f"\nserved recipe ({head}, models/CURRENT): official score {_pct(out['official_score'])}"
          + (f"; others: {others}" if others else ""), flush=True)
    return out


# ----------------------------------------------------------------------------- an evaluation's report


def write_evaluation_report(input_uri, root, cfg, name, config_snapshot, report_to, keys, plan, featurized,
                            per_method: dict[str, dict], t0: float, not_run: dict[str, str]) -> dict:
    """Write ``evaluate/report.{md,json,png}`` (and copies at ``<report_to>.*``); returns their URIs."""
    out_dir = layout.evaluate_dir(root)
    title = f"Accuracy against the DCASE autoencoder baseline: {name or input_uri}"
    counts = plan.counts()
    data = {"input": input_uri, "clips": keys.num_rows, "sha256": data_sha256(keys),
            "quarantined": {k: v.get("n_quarantined") for k, v in featurized.items()}}
    split = {"sha256": plan.sha256(), "derive_fraction": plan.derive_fraction, "derived": plan.derived,
             "excluded": plan.excluded(), "counts": counts,
             "rule": ("train folders' clips (not labelled anomalous) train and form banks; test folders' clips "
                      "are scored; a section without training clips gets floor(n * derive_fraction) of each "
                      "domain's normal test clips (ordered by sha256 of the clip id) as its training split; a "
                      "test clip with the same audio bytes as a training clip is excluded")}
    results = {m: d["result"] for m, d in per_method.items()}
    official = {m: d["official_score"] for m, d in per_method.items()}
    table_md = tables.methods_markdown(results)
    lines = [f"# {title}", "", (f"Data: `{input_uri}`, {keys.num_rows} clips, sha256 of (clip id, content sha256) "
                                f"`{data['sha256']}`."), ""]
    lines += ["Split (the same for every method; split sha256 `" + split["sha256"] + "`):", ""]
    lines += ["| machine type | train / bank clips | test clips (normal / anomaly) | excluded |",
              "|---|---:|---:|---:|"]
    for mt, c in counts.items():
        lines.append(f"| {mt} | {c[TRAIN]} | {c[TEST]} ({c['test_normal']} / {c['test_anomaly']}) | {c[EXCLUDED]} |")
    lines.append("")
    if plan.derived:
        for d in plan.derived:
            lines.append(f"- {d['machine_type']} section {d['section']} has no train split: training split formed "
                         f"from normal test clips {d['train_clips']} (ordered by sha256 of the clip id; never scored).")
    else:
        lines.append("- Every section has its own train split; no training clip is scored.")
    for e in plan.excluded():
        lines.append(f"- excluded `{e['clip_id']}`: {e['reason']}")
    lines += ["", "## Official score (harmonic mean of AUC-source, AUC-target, pAUC)", "",
              "| method | official score | what |", "|---|---:|---|"]
    for m, d in per_method.items():
        served = " (the pipeline's served recipe)" if m == cfg.served else ""
        lines.append(f"| {m} | **{_pct(official[m])}** | {d['title']}{served} |")
    for m, why in not_run.items():
        lines.append(f"| {m} | – | {why} |")
    lines += ["", "## Score per machine type (harmonic mean of its AUC-s, AUC-t, pAUC; percent)", "",
              type_scores_markdown(results),
              "## Per machine type and metric (percent; AUC-s, AUC-t, pAUC are harmonic means over sections)", "",
              table_md]
    lines += _pseudo_label_markdown(per_method)
    notes = training_notes(per_method)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += [("Bar chart: `report.png` beside this file. Per-method scores, DCASE CSVs, ROC curves and "
               f"histograms: `{layout.scores_dir(root, '<method>')}/`."), ""]
    methods = {m: {k: v for k, v in d.items() if k not in ("table", "result")} for m, d in per_method.items()}
    payload = {
        "title": title, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "root": root, "data": data, "split": split, "official_scores": official,
        "served_method": cfg.served, "not_run": not_run,
        "methods": methods, "table_markdown": table_md, "notes": notes,
        "featurize": featurized, "seconds": round(time.perf_counter() - t0, 1),
        "config": {"evaluate": asdict(cfg), "job": config_snapshot},
    }
    md_uri = storage.atomic_write_text(storage.join(out_dir, "report.md"), "\n".join(lines) + "\n")
    json_uri = storage.atomic_write_json(storage.join(out_dir, "report.json"), storage.json_safe(payload))
    png_uri = plots.plot_method_bars(storage.join(out_dir, "report.png"), results)
    copies = []
    if report_to:
        for ext, src in (("md", md_uri), ("json", json_uri), ("png", png_uri)):
            copies.append(storage.atomic_write_bytes(f"{report_to}.{ext}", storage.read_bytes(src)))
    print("\n" + "\n".join(lines), flush=True)
    log.info("evaluation report: %s", md_uri)
    return {"report_md": md_uri, "report_json": json_uri, "report_png": png_uri, "copies": copies}


def type_scores_markdown(results: dict[str, metrics.MetricsResult]) -> str:
    """Rows: machine types and the official score; columns: methods (percent)."""
    methods = list(results)
    types = sorted({t for r in results.values() for t in r.machine_types})
    lines = ["| machine type | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for t in types:
        cells = [tables.pct(results[m].per_type.get(t, float("nan"))) for m in methods]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **official score** | " + " | ".join(f"**{tables.pct(results[m].official_score)}**"
                                                    for m in methods) + " |")
    return "\n".join(lines) + "\n"


_CLUSTERED = {"logmel": "log-mel statistics of the training clips",
              "pretrained": "the pre-trained encoder's embeddings of the training clips"}


def pseudo_label_sets(per_method: dict) -> list[dict]:
    """The pseudo labellings the methods trained on, each once: ``{"labels", "clustered",
    "quality", "methods"}`` (``quality``: per machine type ARI/NMI against the real attributes,
    :func:`asd.stages.pseudo_label.pseudo_label`)."""
    sets: dict[str, dict] = {}
    for m, d in per_method.items():
        lab = (d.get("info") or {}).get("labels") or {}
        if not lab.get("quality"):
            continue
        entry = sets.setdefault(lab["labels"], {"labels": lab["labels"], "clustered": lab.get("clustered"),
                                                "quality": lab["quality"], "methods": []})
        entry["methods"].append(m)
    return list(sets.values())


def _pseudo_label_markdown(per_method: dict) -> list[str]:
    """Per labelling, per machine type: how the Ward pseudo labels agree with the real attributes."""
    sets = pseudo_label_sets(per_method)
    if not sets:
        return []
    lines = ["## Pseudo labels against the real attributes (training split)", ""]
    for s in sets:
        what = _CLUSTERED.get(s["clustered"], str(s["clustered"]))
        lines += [f"Ward clusters of {what} (`{s['labels']}`), used by {', '.join(s['methods'])}:", "",
                  "| machine type | clips | pseudo classes | real classes | ARI | NMI |", "|---|---:|---:|---:|---:|---:|"]
        for mt, q in sorted(s["quality"].items()):
            ari, nmi = q.get("ari"), q.get("nmi")
            lines.append(f"| {mt} | {q.get('n_clips')} | {q.get('n_pseudo_classes')} | {q.get('n_real_classes')} | "
                         + (f"{ari:.3f}" if ari is not None else "n/a") + " | "
                         + (f"{nmi:.3f}" if nmi is not None else "n/a") + " |")
        lines.append("")
    lines += ["Machine types without real attribute labels (`noAttribute`) have no row: there is nothing to "
              "compare their clusters with.", ""]
    return lines


def training_notes(per_method: dict) -> list[str]:
    """One line per method on how it was trained in the run (the autoencoder once for both scores)."""
    notes = []
    ae = next((per_method[m]["info"] for m in ("ae_mse", "ae_mahalanobis") if m in per_method), None)
    if ae is not None:
        types = ae.get("per_type", {})
        what = "; ".join(f"{mt}: {d.get('train_clips')} clips, {d.get('train_vectors')} context vectors, loss "
                         f"{d.get('first_loss', float('nan')):.4g} -> {d.get('final_loss', float('nan')):.4g} (held out "
                         f"{d.get('final_val_loss')})" for mt, d in sorted(types.items()))
        notes.append(f"Autoencoder baseline as published: one model per machine type, {ae.get('epochs')} epochs over "
                     f"every context vector of its training clips (10 % held out) in batches of {ae.get('batch_size')}, "
                     "one Ray task per type; front end = librosa's mel spectrogram (n_fft 1024, hop 512, 128 bins, "
                     f"dB); Mahalanobis reduction `{ae.get('maha_reduction')}` (asd/baselines/autoencoder/ lists every "
                     f"difference from the official code). {what}.")
        fallback = [mt for mt, d in ae.get("per_type", {}).items() if d.get("target_covariance", "").startswith("source")]
        if fallback and "ae_mahalanobis" in per_method:
            notes.append(f"No target-domain training clips for {', '.join(fallback)}: the Mahalanobis target "
                         "covariance is the source one (the official rule), so AE-Mahalanobis there is a "
                         "source-only score.")
    for m, d in per_method.items():
        if m in ("ae_mse", "ae_mahalanobis"):
            continue
        info = d.get("info") or {}
        parts = []
        pre = info.get("pretrain") or {}
        if pre.get("steps") is not None:
            parts.append(f"encoder pre-trained in this run for {pre['steps']} steps on the training split "
                         f"(final loss {pre['final_loss']:.4g})")
        elif info.get("pretrained"):
            parts.append(f"pre-trained encoder `{info['pretrained']}`, trained outside this run (which clips it saw "
                         "is not checked here)")
        lab = info.get("labels") or {}
        for name, tr in (info.get("models") or {}).items():
            if tr.get("steps") is None:
                parts.append(f"{name}: `{tr['encoders'][0]}`, trained outside this run")
                continue
            acc = tr.get("final_accuracy")
            n = len(tr.get("encoders") or [])
            labels = lab.get("source", "?") + (f" of {lab['clustered']}" if lab.get("clustered") else "")
            parts.append(f"{name} trained in this run for {tr['steps']} steps on the training split's {labels} labels "
                         f"({tr.get('num_classes')} classes"
                         + (f", final training accuracy {100 * acc:.1f} %" if acc is not None else "")
                         + (f"; {n} models side by side in one run" if n > 1 else "") + ")")
        if parts:
            notes.append(f"{m}: " + "; ".join(parts) + ".")
    return notes


__all__ = ["pseudo_label_sets", "training_notes", "type_scores_markdown", "write_comparison", "write_evaluation_report"]
