"""mixcls predict: fold ensemble + TTA over a folder of images -> submission CSV."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="fold ensemble + TTA -> submission.csv",
        description="Average class probabilities over every fold's best checkpoint and the first "
        "--tta deterministic views (the image as it is first, then flips and transpose).")
    p.add_argument("--run", required=True, help="a finished mixcls run folder")
    p.add_argument("--images", required=True, help="folder of test images")
    p.add_argument("--ids", help="CSV with an image_id column (e.g. sample_submission.csv)")
    p.add_argument("--tta", type=int, default=None,
                   help="the first N of the run's TTA views (default: the setting of mixcls tta "
                   "--apply, else the run's tta)")
    p.add_argument("--img-size", type=int, default=None,
                   help="resize the images to this side (default: the setting of mixcls tta "
                   "--apply, else each model's training size); not for a blend")
    p.add_argument("--out", default="submission.csv", help="submission file to write")
    p.add_argument("--with-probs", action="store_true", help="also write prob_0 … prob_{K-1}")
    p.add_argument("--label-names", action="store_true", help="write class names, not indices")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--models", default="folds", choices=["folds", "full", "all"],
                   help="the fold models, the full-data model of a --full-fit run, or both (each "
                   "model weighs the same); for a blend, of each member, the blend's rule "
                   "applied model by model")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    import time

    from mixcls.blend import is_blend_folder, predict_blend
    from mixcls.data import DataError
    from mixcls.predict import predict_run, resolve_images, write_submission
    from mixcls.runs import RunFolder
    from mixcls.tta import inference_setting

    RunFolder(Path(args.run)).classes  # fail on a wrong --run before reading images
    blend = is_blend_folder(args.run)
    if args.img_size is not None and (blend or args.img_size < 8):
        raise DataError(f"--img-size {args.img_size}: " + (
            "a blend predicts each member at the size it was blended with; set a member's size "
            "with mixcls tta --apply and blend again" if blend else "must be at least 8 px"))
    setting = None if blend else inference_setting(args.run)  # a damaged tta.json fails here
    ids, paths = resolve_images(args.images, args.ids)
    options = dict(tta=args.tta, device=args.device, batch_size=args.batch_size,
                   workers=args.workers, amp=args.amp)
    start = time.perf_counter()
    if blend:  # mixcls blend's folder: the rule per model, then the mean
        probs = predict_blend(args.run, paths, models=args.models, **options)
    else:
        probs = predict_run(args.run, paths, models=args.models, img_size=args.img_size,
                            setting=setting, **options)
    seconds = time.perf_counter() - start
    if setting is not None and setting.applied:
        views = (f"the first {args.tta} view(s) (--tta)" if args.tta is not None
                 else f"{len(setting.views)} view(s) ({', '.join(setting.views)})")
        print(f"predicted with {views} at {args.img_size or setting.img_size} px "
              f"(applied by mixcls tta: {setting.source})")
    write_submission(args.out, ids, probs, run_dir=args.run, with_probs=args.with_probs,
                     label_names=args.label_names)
    # the whole prediction, loading, decoding and every model and view included: what a
    # notebook's time limit sees
    print(f"wrote {args.out}: {len(ids)} rows; predicted in {seconds:.1f} s "
          f"({len(ids) / max(seconds, 1e-9):.1f} images/s)")
    return 0
