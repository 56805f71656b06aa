"""``tvmgroup prebuild``: compiles the kernels a model needs into the kernel cache."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prebuild",
        help="compile the kernels a model needs into the kernel cache",
        description="Runs the model's factory, finds its tvmgroup layers and the row counts they see on "
        "its example inputs (on fake tensors: nothing is computed), and compiles every kernel a training "
        "step calls into $TVMGROUP_HOME/kernels, so that the first step of a later process loads them "
        "instead of compiling.",
    )
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="a function returning (model, example_inputs); MODULE is importable or a .py file")
    p.add_argument("--inference", action="store_true", help="only the forward kernels (no gradient kernels)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from tvmgroup.discovery import find_layers, model_from_factory, op_shapes
    from tvmgroup.paths import kernel_cache_dir
    from tvmgroup.prebuild import prebuild_shapes

    model, inputs = model_from_factory(args.model)
    shapes = op_shapes(find_layers(model, inputs), backward=not args.inference)
    if not shapes:
        print(f"{args.model}: no tvmgroup layer runs on the example inputs; nothing to build")
        return 0
    print(f"{len(shapes)} op shapes in {args.model}; kernels -> {kernel_cache_dir()}")
    start = time.perf_counter()

    def done(built) -> None:
        variant = "serial" if built.serial else "parallel"
        print(f"  {built.spec.key} ({built.device}, {variant}, {built.origin} schedule): {built.seconds:.1f} s", flush=True)

    with warnings.catch_warnings():
        # Each line below names the schedule that serves; the untuned-shape warnings would repeat it.
        from tvmgroup.lookup import UntunedShapeWarning

        warnings.simplefilter("ignore", UntunedShapeWarning)
        built = prebuild_shapes(shapes, on_done=done)
    print(f"{len(built)} kernels ready in {time.perf_counter() - start:.1f} s")
    return 0
