"""Client-side tools of the Delf service: extract features of image files, match two files (images or
saved features) and draw the inliers, fit a descriptor PCA. Everything goes through the gRPC service, so
what they show is what clients get."""

from __future__ import annotations

import argparse
import colorsys
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from vision.api.codec import features_from_message, features_message
from vision.client.channel import Target, open_channel
from vision.media.imaging import IMAGE_SUFFIXES, image_files
from vision.tasks.delf import DelfFeatures
from vision.v1 import common_pb2, delf_pb2, delf_pb2_grpc

# `vision delf-extract --save DIR` writes DIR/<stem>FEATURES_SUFFIX; `vision delf-match` reads such files.
FEATURES_SUFFIX = ".delf.npz"


class ClientError(Exception):
    """A local problem (unreadable file, bad flag) reported without a traceback."""


@dataclass(frozen=True)
class Options:
    scales: tuple[float, ...] = ()
    max_keypoints: int | None = None
    score_threshold: float | None = None
    max_image_side: int | None = None
    nms_iou: float | None = None
    skip_pca: bool = False
    model: str = ""
    version: str = ""

    def message(self) -> delf_pb2.DelfExtractOptions:
        msg = delf_pb2.DelfExtractOptions(scales=self.scales, skip_pca=self.skip_pca)
        for name in ("max_keypoints", "score_threshold", "max_image_side", "nms_iou"):
            if getattr(self, name) is not None:
                setattr(msg, name, getattr(self, name))
        return msg

    def selector(self) -> common_pb2.ModelSelector:
        return common_pb2.ModelSelector(name=self.model, version=self.version)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None


def features_file(features: delf_pb2.DelfFeatures, path: Path) -> None:
    """Save an Extract result (what `read_input` reads back)."""
    n, dim = len(features.keypoints), features.descriptor_dim
    points = np.array([(k.x, k.y, k.scale, k.score) for k in features.keypoints], dtype=np.float32).reshape(n, 4)
    np.savez(
        path,
        size=np.array([features.image_width, features.image_height]),
        keypoints=points,
        descriptors=np.frombuffer(features.descriptors, dtype="<f4").reshape(n, dim),
        model=np.array([features.model.name, features.model.version]),
    )


def read_features(path: Path) -> delf_pb2.DelfFeatures:
    try:
        with np.load(path, allow_pickle=False) as data:
            width, height = (int(v) for v in data["size"])
            points, descriptors = data["keypoints"].astype(np.float32), data["descriptors"].astype("<f4")
            name, version = (str(v) for v in data["model"])
    except (OSError, KeyError, ValueError) as exc:
        raise ClientError(f"{path} is not a features file written by `vision delf-extract --save`: {exc}") from None
    n, dim = points.shape[0], descriptors.shape[1] if descriptors.ndim == 2 else 0
    features = DelfFeatures(
        width, height, points[:, :2], points[:, 2], points[:, 3], descriptors.reshape(n, dim).astype(np.float32)
    )
    return features_message(features, common_pb2.ModelInfo(name=name, version=version))


def read_input(path: Path) -> delf_pb2.DelfMatchInput:
    """An image file, or a saved features file (*.delf.npz)."""
    if path.name.endswith(FEATURES_SUFFIX):
        return delf_pb2.DelfMatchInput(features=read_features(path))
    return delf_pb2.DelfMatchInput(image=common_pb2.Image(id=path.name, content=_read(path)))


def extract(target: Target, paths: Sequence[Path], options: Options, timeout: float) -> delf_pb2.DelfExtractResponse:
    request = delf_pb2.DelfExtractRequest(
        model=options.selector(),
        images=[common_pb2.Image(id=str(p), content=_read(p)) for p in paths],
        options=options.message(),
    )
    with open_channel(target) as ch:
        return delf_pb2_grpc.DelfStub(ch).Extract(request, timeout=timeout)


def extract_features(
    target: Target, contents: Sequence[bytes], options: Options, *, batch_size: int = 4, timeout: float = 120.0
) -> tuple[list[DelfFeatures], common_pb2.ModelInfo]:
    """DELF features of encoded images, in order, as numpy (for matching on the client side), and the model
    that extracted them. A few images per request: each answer carries up to 1000 keypoints per image."""
    out: list[DelfFeatures] = []
    model = common_pb2.ModelInfo(name=options.model, version=options.version)
    with open_channel(target) as ch:
        stub = delf_pb2_grpc.DelfStub(ch)
        for start in range(0, len(contents), batch_size):
            chunk = contents[start : start + batch_size]
            request = delf_pb2.DelfExtractRequest(
                model=options.selector(),
                images=[common_pb2.Image(id=str(start + i), content=c) for i, c in enumerate(chunk)],
                options=options.message(),
            )
            response = stub.Extract(request, timeout=timeout)
            out.extend(features_from_message(r.features, "response") for r in response.results)
            model = response.model
    return out, model


def match(
    target: Target, a: Path, b: Path, options: Options, timeout: float, *, match_options: delf_pb2.DelfMatchOptions | None = None
) -> delf_pb2.DelfMatchResponse:
    request = delf_pb2.DelfMatchRequest(
        model=options.selector(), a=read_input(a), b=read_input(b), extract_options=options.message(),
        options=match_options or delf_pb2.DelfMatchOptions(),
    )
    with open_channel(target) as ch:
        return delf_pb2_grpc.DelfStub(ch).Match(request, timeout=timeout)


def draw_matches(a: Image.Image, b: Image.Image, response: delf_pb2.DelfMatchResponse, *, height: int = 600) -> Image.Image:
    """Both images side by side at one height, a line between each inlier pair (the DELF paper's figures)."""
    scale_a, scale_b = height / a.height, height / b.height
    a = a.convert("RGB").resize((max(1, round(a.width * scale_a)), height), Image.Resampling.BILINEAR)
    b = b.convert("RGB").resize((max(1, round(b.width * scale_b)), height), Image.Resampling.BILINEAR)
    gap = 10
    canvas = Image.new("RGB", (a.width + gap + b.width, height), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    draw = ImageDraw.Draw(canvas)
    n = len(response.correspondences)
    for i, c in enumerate(response.correspondences):
        r, g, bl = colorsys.hsv_to_rgb((i * 0.618) % 1.0, 0.9, 1.0)
        colour = (int(r * 255), int(g * 255), int(bl * 255))
        start = ((c.a_x + 0.5) * scale_a - 0.5, (c.a_y + 0.5) * scale_a - 0.5)
        end = ((c.b_x + 0.5) * scale_b - 0.5 + a.width + gap, (c.b_y + 0.5) * scale_b - 0.5)
        draw.line([start, end], fill=colour, width=1 if n > 200 else 2)
        for x, y in (start, end):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
    return canvas


def open_image(path: Path) -> Image.Image:
    """The image as the server sees it (EXIF orientation applied), for drawing on."""
    try:
        with Image.open(io.BytesIO(_read(path))) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except OSError as exc:
        raise ClientError(f"cannot draw {path}: {exc}") from None


@dataclass(frozen=True)
class PcaFit:
    images: int
    descriptors: int
    dim: int
    input_dim: int
    explained: float
    model: str
    version: str


def fit_pca(
    target: Target, folder: Path, out: Path, options: Options, *, dim: int, whiten: bool, batch_size: int = 4,
    max_images: int | None = None, timeout: float = 300.0,
) -> PcaFit:
    """Extract descriptors before PCA from the images under `folder` through the server, fit a PCA, save it."""
    from vision.tasks.delf import fit_pca as fit

    try:
        paths = image_files(folder, recursive=True)[: max_images or None]
    except NotADirectoryError as exc:
        raise ClientError(str(exc)) from None
    if not paths:
        raise ClientError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    raw = Options(**{**options.__dict__, "skip_pca": True})
    rows: list[np.ndarray] = []
    model = ("", "")
    for start in range(0, len(paths), batch_size):
        response = extract(target, paths[start : start + batch_size], raw, timeout)
        model = (response.model.name, response.model.version)
        for result in response.results:
            f = result.features
            if len(f.keypoints):
                rows.append(np.frombuffer(f.descriptors, dtype="<f4").reshape(len(f.keypoints), f.descriptor_dim))
    descriptors = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
    try:
        pca = fit(descriptors, dim, whiten=whiten, model=model[0], version=model[1], images=len(paths))
    except ValueError as exc:
        raise ClientError(str(exc)) from None
    # ddof=1, as np.cov in the fit: the explained share is a ratio of the same variances.
    total = float(np.var(descriptors, axis=0, ddof=1).sum())
    explained = float(pca.variances.sum() / total) if total > 0 else 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    pca.save(out)
    return PcaFit(len(paths), len(descriptors), pca.dim, pca.input_dim, explained, *model)


# --------------------------------------------------------------------------------------
# The `vision delf-extract`, `vision delf-match` (`vision match`) and `vision fit-delf-pca` commands
# --------------------------------------------------------------------------------------

EXTRACT_HELP = """\
DELF keypoints (x, y in original-image pixels, scale, attention score) and descriptors of each image,
extracted over an image pyramid (scales 0.25 ... 2 of the image capped at 1024 px) with the reference DELF
settings, through a running server's vision.v1.Delf service. See docs/delf.md.
"""

MATCH_HELP = """\
Matches A and B through a running server's vision.v1.Delf service: nearest neighbours in descriptor space
within a distance of 0.8, then RANSAC with an affine model (3 samples, 20 px residual threshold, 1000
trials), as the reference DELF. Prints the inlier count (the match score) and the A->B transform;
--out draws both images side by side with a line per inlier. A side may be an image or features saved by
`vision delf-extract --save DIR`.
"""

FIT_PCA_HELP = """\
Extracts descriptors before PCA (the map's full width) from every image under IMAGES through the running
server, fits a PCA (the top --dim eigenvectors of their covariance; the reference DELF uses 40, no
whitening) and writes it to --out. Serve it with the model it was fitted on:
  vision serve --model arch=delf_resnet50,weights=delf.pt,delf_pca=pca.npz
"""


# A full pyramid of a few large images takes seconds on a CPU; the other clients' 30 s is tight for it.
TIMEOUT_S = 120.0


def add_extract_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("extraction (unset = the model's settings, the reference DELF defaults)")
    group.add_argument("--scales", help="comma-separated pyramid scales (default 0.25,0.3536,0.5,0.7071,1,1.4142,2)")
    group.add_argument("--max-keypoints", type=int, help="keypoints per image, best first (default 1000)")
    group.add_argument("--score-threshold", type=float, help="minimum attention score (default: the model's)")
    group.add_argument("--max-image-side", type=int, help="cap of the longer side before the pyramid (default 1024)")
    group.add_argument("--nms-iou", type=float, help="NMS over receptive boxes at this IoU (default 1 = none)")
    group.add_argument("--model", default="", help="model name (default: the server's default DELF model)")
    group.add_argument("--version", default="", help="model version (default: its default version)")


def add_commands(client: Callable[..., argparse.ArgumentParser]) -> None:
    """delf-extract, delf-match (alias match), fit-delf-pca; `client(name, help, timeout)` adds a parser with
    the client commands' --target and --timeout (vision.client.commands), here with DELF's longer deadline."""
    extract = client("delf-extract", "DELF keypoints and descriptors of images through a running server", TIMEOUT_S)
    extract.description = EXTRACT_HELP
    extract.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, WebP, BMP, GIF)")
    extract.add_argument("--show", type=int, default=5, help="print the best N keypoints per image (default 5)")
    extract.add_argument(
        "--save", type=Path, metavar="DIR", help="write DIR/<name>.delf.npz per image (delf-match reads them)"
    )
    extract.add_argument("--json", action="store_true", help="print the response as JSON")
    add_extract_options(extract)
    extract.set_defaults(func=run)

    for name, help_text in (
        ("delf-match", "match two images with DELF + RANSAC through a running server (alias: match)"),
        ("match", "same as delf-match"),
    ):
        match = client(name, help_text, TIMEOUT_S)
        match.description = MATCH_HELP
        match.add_argument("a", type=Path, help="image file, or features saved by delf-extract --save (*.delf.npz)")
        match.add_argument("b", type=Path, help="the other side, likewise")
        match.add_argument("--out", type=Path, help="draw both images side by side with a line per inlier (PNG)")
        match.add_argument("--json", action="store_true", help="print the response as JSON")
        add_extract_options(match)
        match.set_defaults(func=run)

    fit = client("fit-delf-pca", "fit the DELF descriptor PCA on a folder of images through a running server", TIMEOUT_S)
    fit.formatter_class = argparse.RawDescriptionHelpFormatter
    fit.epilog = FIT_PCA_HELP
    fit.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    fit.add_argument("--out", type=Path, required=True, help="PCA file to write (.npz; serve it with delf_pca=FILE)")
    fit.add_argument("--dim", type=int, default=40, help="dimensions kept (default 40, the reference's)")
    fit.add_argument("--whiten", action="store_true", help="divide by the axes' standard deviations (default off)")
    fit.add_argument("--batch-size", type=int, default=4, help="images per Extract request (default 4)")
    fit.add_argument("--max-images", type=int, help="use at most this many images")
    add_extract_options(fit)
    fit.set_defaults(func=run)


def options_from(args: argparse.Namespace, *, skip_pca: bool = False) -> Options:
    try:
        scales = tuple(float(s) for s in args.scales.split(",") if s.strip()) if args.scales else ()
    except ValueError:
        raise ClientError(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
    return Options(scales, args.max_keypoints, args.score_threshold, args.max_image_side, args.nms_iou, skip_pca,
                   args.model, args.version)


def _json(message: object) -> str:
    import json

    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(message), indent=2)  # type: ignore[arg-type]


def run_extract(args: argparse.Namespace) -> int:
    response = extract(args.target, args.images, options_from(args), args.timeout)
    if args.json:
        print(_json(response))
        return 0
    print(f"model {response.model.name} version {response.model.version}")
    for path, result in zip(args.images, response.results, strict=True):
        f = result.features
        print(f"{result.image_id}: {f.image_width}x{f.image_height}, {len(f.keypoints)} keypoints, {f.descriptor_dim}-d descriptors")
        if args.show and f.keypoints:
            print(f"  {'x':>8} {'y':>8} {'scale':>7} {'score':>9}")
            for k in list(f.keypoints)[: args.show]:
                print(f"  {k.x:8.1f} {k.y:8.1f} {k.scale:7.3f} {k.score:9.3f}")
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            target = args.save / (Path(path).name.rsplit(".", 1)[0] + FEATURES_SUFFIX)
            features_file(f, target)
            print(f"  saved {target}")
    return 0


def run_match(args: argparse.Namespace) -> int:
    for path in (args.a, args.b):
        if args.out and path.name.endswith(FEATURES_SUFFIX):
            raise ClientError(f"--out draws the images; {path} is a features file")
    response = match(args.target, args.a, args.b, options_from(args), args.timeout)
    if args.json:
        print(_json(response))
    else:
        print(f"model {response.model.name} version {response.model.version}")
        print(f"a {args.a}: {response.keypoints_a} keypoints")
        print(f"b {args.b}: {response.keypoints_b} keypoints")
        print(f"putative matches {response.putative_matches}, inliers {response.inliers}")
        if response.transform:
            m = list(response.transform)
            print(f"affine a->b: [[{m[0]:.4f} {m[1]:.4f} {m[2]:.2f}] [{m[3]:.4f} {m[4]:.4f} {m[5]:.2f}]]")
        else:
            print("no transform verified")
    if args.out:
        draw_matches(open_image(args.a), open_image(args.b), response).save(args.out)
        if not args.json:
            print(f"wrote {args.out}")
    return 0


def run_fit_pca(args: argparse.Namespace) -> int:
    if args.dim < 1:
        raise ClientError("--dim must be at least 1")
    fitted = fit_pca(
        args.target, args.images, args.out, options_from(args), dim=args.dim, whiten=args.whiten,
        batch_size=args.batch_size, max_images=args.max_images, timeout=args.timeout,
    )
    print(
        f"fitted a {fitted.dim}-d PCA{' with whitening' if args.whiten else ''} of {fitted.input_dim}-d descriptors "
        f"on {fitted.descriptors} descriptors from {fitted.images} images (model {fitted.model} version "
        f"{fitted.version}; {100 * fitted.explained:.1f}% of the variance kept); wrote {args.out}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry of the three commands: server and file errors end them with a message, not a traceback."""
    import sys

    command = {"delf-extract": run_extract, "delf-match": run_match, "match": run_match, "fit-delf-pca": run_fit_pca}
    try:
        return command[args.command](args)
    except ClientError as exc:
        print(f"vision {args.command}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error from {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
