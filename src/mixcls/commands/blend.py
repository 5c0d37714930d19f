"""`mixcls blend RUN RUN … --out BLEND`: combine finished runs, scored by nested CV."""

from __future__ import annotations

import argparse

from mixcls.blend import BLEND_METHODS, CLASS_BIAS_METRICS, METRICS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "blend", help="blend finished runs (mean, weighted, rank, caruana, stack), nested CV",
        description="Combine the out-of-fold probabilities of runs trained on the same folds. "
                    "Weights, stacker and temperature are fitted on all OOF rows for prediction; "
                    "the reported CV is nested (fold g is scored by a rule fitted without its "
                    "rows), with the optimistic in-sample figure beside it. Predict the blend "
                    "with: mixcls predict --run BLEND.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished run folders")
    p.add_argument("--out", required=True, help="new blend folder to write")
    p.add_argument("--method", required=True, choices=BLEND_METHODS,
                   help="mean / rank: no fitting; weighted: log-loss weights on the simplex; "
                        "caruana: bagged forward selection; stack: logistic regression on "
                        "log-probabilities, its C chosen by CV over the folds")
    p.add_argument("--metric", default="logloss", choices=METRICS,
                   help="what caruana's forward selection optimises (weighted and stack always "
                        "fit log-loss; mean and rank fit nothing)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit one temperature on the blended OOF (nested like the blend)")
    p.add_argument("--class-bias", default="none", choices=CLASS_BIAS_METRICS,
                   help="after blending (and --calibrate), add one log-probability bias per class, "
                        "fitted on the OOF rows to maximise macro_f1 or accuracy (nested like the "
                        "blend): moves the decisions toward classes the blend under-predicts, for "
                        "a metric that averages over classes")
    p.add_argument("--seed", type=int, default=0, help="seed of caruana's bags")
    p.set_defaults(func=run_blend)


def _row(name: str, scores: dict[str, float]) -> str:
    return (f"  {name:<32} {scores['accuracy']:9.4f} {scores['macro_f1']:9.4f} "
            f"{scores['logloss']:9.4f}")


def _against_best_member(metrics: dict, out: str) -> str:
    """The blend's nested accuracy minus its best member's, paired on the OOF rows (as
    `mixcls runs --against`): is the gain more than the rows' noise?"""
    from mixcls.run_table import oof_correct, paired_oof_difference

    best = max(metrics["members"], key=lambda m: m["cv_accuracy"])
    diff, se, rows = paired_oof_difference(out, oof_correct(best["path"]))
    return (f"  blend - best member ({best['name']}), nested accuracy: {diff:+.4f}, paired SE "
            f"{se:.4f} over {rows} OOF rows (row noise only, not seed-to-seed)")


def run_blend(args: argparse.Namespace) -> int:
    from mixcls.blend import blend_runs, fit_objective

    metrics = blend_runs(args.runs, args.out, method=args.method, metric=args.metric,
                         calibrate=args.calibrate, class_bias=args.class_bias, seed=args.seed)
    nested = {"accuracy": metrics["cv_accuracy"], "macro_f1": metrics["cv_macro_f1"],
              "logloss": metrics["cv_logloss"]}
    in_sample = metrics["in_sample"]
    print(f"  {'':<32} {'accuracy':>9} {'macro F1':>9} {'log-loss':>9}")
    for member in metrics["members"]:
        print(_row(member["name"], {k: member[f"cv_{k}"] for k in nested}))
    print(_row(f"blend {args.method}, nested CV", nested))
    print(_row("blend, in-sample (optimistic)", in_sample))
    print(_row("gap (in-sample - nested)", {k: in_sample[k] - nested[k] for k in nested}))
    print(_against_best_member(metrics, args.out))
    if args.class_bias != "none":
        from mixcls.blend import read_blend

        bias = read_blend(args.out)["class_bias"]
        print(f"  class biases for {args.class_bias} (all rows): "
              + " ".join(f"{b:+.1f}" for b in bias)
              + "; the log-loss is that of the biased probabilities")
    for member in metrics["members"]:
        if member["oof"] == "oof.csv" and len(member["views"]) > 1:
            print(f"note: {member['name']} predicts with {len(member['views'])} TTA views but its "
                  "oof.csv has one, so the blend was fitted on other probabilities than it will "
                  f"combine; score the views with mixcls tta --run {member['path']} --apply, then "
                  "blend again")
    objective = fit_objective(args.method, args.metric)
    if args.metric == "accuracy" and objective == "logloss":
        print(f"note: {args.method} fits log-loss (accuracy is a step function, no gradient); "
              "--metric accuracy steers only caruana's selection")
    print(f"wrote {args.out} (blend.json, oof.csv, metrics.json, report.html); "
          f"predict with: mixcls predict --run {args.out} --images …")
    return 0
