#!/usr/bin/env bash
# Wheels that let omni-train import and run on the lent GPU machine (the `run` tool's nvidia-h200:
# Python 3.12.3 at /opt/torch/.venv/bin/python3, x86_64, no network). The repository travels with
# each `run`; these wheels travel with it as the ignored folder .whl/ (named in `carry`), and the
# machine's own packages (benchmarks/gpu/provided.txt) are kept: its torch 2.11.0+cu130, triton,
# numpy 2.5.2, transformers 5.17.0, tokenizers, huggingface-hub, pyarrow, pandas, scipy,
# matplotlib, tensorboard, pillow, numba, onnx, pytorch-lightning 2.6.6, torchmetrics, ...
#
#   bash benchmarks/gpu/wheels.sh             fetch into .whl/ (idempotent), check tags, print sizes
#   bash benchmarks/gpu/wheels.sh --verify    + resolve the wheels against provided.txt (pip, cp312)
#   bash benchmarks/gpu/wheels.sh --simulate  + a Python 3.11 stand-in of the machine here: a venv
#                                               holding only provided.txt's packages, the wheels
#                                               installed with the command below, then the imports
#                                               and 2 CPU steps of the tiny omni smoke stage
#
# A `run` command starts with (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# e.g. `... && python3 benchmarks/gpu/check.py --out $OUT/check`. PYTHONPATH puts these ahead of
# the machine's site-packages; omni-train itself runs from the repository root (no wheel).
#
# What is carried, and why. Versions are our CPU pins (requirements/constraints-cpu.txt), read
# from that file at fetch time. Found by tracing every module that the smoke path imports (data
# synth + a training run of stage=smoke_omni_gpu + benchmarks/gpu/check.py's kernel imports) and
# keeping each distribution the machine lacks or has in a version that does not fit:
#   omni-train's own dependencies (pyproject.toml), absent there:
#     megatron-core 0.16.1 (cp312), megatron-energon 7.4.1, hydra-core 1.3.2, omegaconf 2.3.0,
#     antlr4-python3-runtime 4.9.3 (sdist only: built here into a pure-Python wheel),
#     webdataset 1.0.2 + braceexpand, av 18.1.0 (video/audio decoding, FFmpeg bundled; data synth
#     encodes with it), soundfile 0.14.0 (libsndfile bundled) + cffi (absent there), soxr 1.1.0
#   what megatron-energon imports: filetype, rapidyaml (ryml) + deprecation, multi-storage-client
#     (energon's paths; cp312, Rust inside) + xattr, lark, wcmatch, bracex, jsonschema,
#     jsonschema-specifications, referencing, rpds-py, opentelemetry-api
#   the `audio` extra, nemo-toolkit[asr] 3.0.0: omni_train/model/audio.py imports
#     nemo.collections.asr.modules (ConformerEncoder, AudioToMelSpectrogramPreprocessor), which
#     imports all of nemo.collections.asr, and with it nemo.core (lightning, nv-one-logger), lhotse,
#     librosa, datasets, kaldialign:
#     nemo-toolkit, lightning 2.4.0 (nemo 3.0.0 requires lightning<=2.4.0; the machine's lightning
#     goes with its pytorch-lightning 2.6.6), lhotse + intervaltree + cytoolz, librosa + pooch +
#     platformdirs + decorator, kaldialign (cp312), datasets + dill + multiprocess,
#     nv-one-logger-core/-training-telemetry/-pytorch-lightning-integration + StrEnum + overrides
#     + toml + pydantic + pydantic-core (cp312) + annotated-types + typing-inspection
#   typing-extensions 4.16.0: pydantic(-core) requires >=4.16.0 and the machine's version was
#     never read (a precaution, 45 kB; drop it once `pip list` there shows >=4.16)
# Not carried (NOT_CARRIED below): declared by a carried package (or by omni-train) but never
# imported on the smoke path: wandb (20 MB; logging.wandb is false in every recipe, and every
# wandb import in megatron, nemo and omni-train is optional or lazy) with its opentelemetry
# exporters, googleapis-common-protos and cwevals; botocore (imported only if present, by
# tensorboard's optional S3 support; nothing declares it);
# audioread, aistore, smart-open, text-unidecode, whisper-normalizer (nemo/lhotse/librosa, lazy);
# mfusepy, s3fs (energon's remote storage); jmespath, prettytable, pyroute2, tzdata (msc, lazy);
# pycparser (cffi's modules here are precompiled); transformers 5.23's httpx2, httpcore2,
# truststore, sniffio: the machine's transformers 5.17.0 stays, since the smoke path only uses
# PreTrainedTokenizerFast (omni_train/data/tokenizer.py), while 5.23 is needed only for
# `checkpoint compare` (the nemotron_h_omni reference model). torch stays at the machine's 2.11
# (omni-train needs >=2.5, megatron-core >=2.6).
#
# Size: wheels over 1 MiB are re-compressed with LZMA (same files, same RECORD; pip reads such
# zips with Python's zipfile): av 35.8 MB -> 26.8 MB, multi-storage-client 8.6 -> 5.7 MB, ...
# 2026-12: 48 wheels, 46.7 MiB (av 25.5 MiB of it); with the working tree (1.5 MiB) 48.2 MiB of
# the 64 MiB a `run` may carry. The script fails if the total passes 60 MiB (LIMIT_MIB). Adding
# wandb would not fit (20 MB as published, 15 MB re-compressed, plus its dependencies).
#
# Python for pip here: $PYTHON, else .venv/bin/python, else python3 (needs pip; --verify and
# --simulate need Python >= 3.11 for tomllib).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
WHL=.whl
LIMIT_MIB=${LIMIT_MIB:-60}
SIM_DIR=${SIM_DIR:-/tmp/omni-train-gpu-sim}
VERIFY=0
SIMULATE=0
for arg in "$@"; do
  case $arg in
    --verify) VERIFY=1 ;;
    --simulate) SIMULATE=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "wheels.sh: unknown argument $arg (--verify, --simulate)" >&2; exit 2 ;;
  esac
done

# Carried: every one at its pin in requirements/constraints-cpu.txt.
CARRY=(
  megatron-core megatron-energon hydra-core omegaconf antlr4-python3-runtime webdataset
  braceexpand av soundfile cffi soxr
  filetype rapidyaml deprecation multi-storage-client xattr lark wcmatch bracex jsonschema
  jsonschema-specifications referencing rpds-py opentelemetry-api
  nemo-toolkit lightning lhotse intervaltree cytoolz librosa pooch platformdirs decorator
  kaldialign datasets dill multiprocess nv-one-logger-core nv-one-logger-training-telemetry
  nv-one-logger-pytorch-lightning-integration strenum overrides toml pydantic pydantic-core
  annotated-types typing-inspection typing-extensions
)
# Published as sdists only: built here with `pip wheel` (pure Python, so py3-none-any).
SDIST_ONLY=(antlr4-python3-runtime)
# Required by a carried package (or omni-train) but not imported on the smoke path (see above);
# --verify stands them in with version-only wheels so that pip's resolution can close.
NOT_CARRIED=(
  wandb audioread aistore smart-open text-unidecode whisper-normalizer mfusepy s3fs
  jmespath prettytable pyroute2 tzdata pycparser
)
# The machine's glibc is >= 2.28: its torch (cu130) wheels are manylinux_2_28.
PLATFORMS=(
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)

read -r -d '' HELPER <<'PYEOF' || true
import json, os, re, subprocess, sys, tempfile, zipfile
from pathlib import Path
try:
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging import tags as ptags
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging import tags as ptags
    from pip._vendor.packaging.version import Version

WHL = Path(os.environ["WHL"])
MIB = 1024 * 1024


def pins():
    """Our CPU pins, read by the parser the GPU constraints are made with (docker/pins.py)."""
    sys.path.insert(0, "docker")
    from pins import CPU_CONSTRAINTS, read_pins

    return {key: version for key, (_, version) in read_pins(CPU_CONSTRAINTS).items()}


def pinned(names):
    p = pins()
    missing = [n for n in names if canonicalize_name(n) not in p]
    if missing:
        sys.exit(f"wheels.sh: no pin in requirements/constraints-cpu.txt for {missing}")
    return [f"{n}=={p[canonicalize_name(n)]}" for n in names]


def wheels():
    out = {}
    for f in sorted(WHL.glob("*.whl")):
        name, ver, _, _ = parse_wheel_filename(f.name)
        out.setdefault(name, []).append((str(ver), f))
    return out


def provided():
    out = {}
    for line in Path("benchmarks/gpu/provided.txt").read_text().splitlines():
        spec, _, note = line.partition("#")
        if "==" in spec:
            name, ver = spec.split("==", 1)
            out[canonicalize_name(name)] = (ver.strip(), note.strip())
    return out


def cmd_plan(specs):
    """Print the specs not yet in .whl; remove wheels of other names or versions."""
    want = {canonicalize_name(s.split("==")[0]): str(Version(s.split("==")[1])) for s in specs}
    for name, items in wheels().items():
        for ver, f in items:
            if want.get(name) != ver:
                print(f"wheels.sh: removing {f.name} (not in the carried set)", file=sys.stderr)
                f.unlink()
    have = wheels()
    for s in specs:
        name, ver = s.split("==")
        if not any(v == str(Version(ver)) for v, _ in have.get(canonicalize_name(name), [])):
            print(s)


def cmd_repack():
    """Re-compress wheels over 1 MiB with LZMA: the same members and RECORD, smaller zip."""
    for f in sorted(WHL.glob("*.whl")):
        if f.stat().st_size <= MIB:
            continue
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
            if all(i.compress_type == zipfile.ZIP_LZMA for i in infos if i.file_size):
                continue
            tmp = f.with_suffix(".repack")
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as out:
                for i in infos:
                    ni = zipfile.ZipInfo(i.filename, date_time=i.date_time)
                    ni.external_attr = i.external_attr
                    ni.compress_type = zipfile.ZIP_LZMA if i.file_size else zipfile.ZIP_STORED
                    out.writestr(ni, z.read(i))
        before = f.stat().st_size
        tmp.replace(f)
        print(f"wheels.sh: LZMA {f.name}: {before / MIB:.1f} -> {f.stat().st_size / MIB:.1f} MiB")


def supported(pyver):
    plats = [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)]
    plats += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    interp = f"cp{pyver[0]}{pyver[1]}"
    tags = list(ptags.cpython_tags(pyver, [interp], plats))
    tags += list(ptags.compatible_tags(pyver, interp, plats))
    return set(tags)


def cmd_tags(carried):
    ok = supported((3, 12))
    have = wheels()
    bad = [f.name for items in have.values() for _, f in items
           if not (parse_wheel_filename(f.name)[3] & ok)]
    dup = [n for n, items in have.items() if len(items) > 1]
    missing = sorted({canonicalize_name(n) for n in carried} - set(have))
    extra = sorted(set(have) - {canonicalize_name(n) for n in carried})
    for what, lst in (("not installable on cp312 manylinux_2_28 x86_64", bad),
                      ("more than one version", dup), ("missing", missing), ("unexpected", extra)):
        if lst:
            sys.exit(f"wheels.sh: {what}: {lst}")


def tree_files():
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode().split("\0")
    files = {p for p in out if p and os.path.lexists(p)}
    if os.path.isdir("shared"):  # travels too, ignored or not
        files |= {str(Path(d, f)) for d, _, fs in os.walk("shared") for f in fs}
    return files


def cmd_size(limit_mib):
    rows = sorted(((f.stat().st_size, f.name) for f in WHL.glob("*.whl")), reverse=True)
    for size, name in rows:
        print(f"  {size / MIB:8.2f} MiB  {name}")
    whl = sum(s for s, _ in rows)
    tree = sum(os.lstat(p).st_size for p in tree_files())
    total = whl + tree
    print(f"wheels: {len(rows)} files, {whl / MIB:.2f} MiB; working tree (tracked + untracked, "
          f"not ignored): {tree / MIB:.2f} MiB; total carried by a run: {total / MIB:.2f} MiB "
          f"(limit {limit_mib} MiB here, 64 MiB on the tool)")
    if total > limit_mib * MIB:
        sys.exit(f"wheels.sh: FAIL: {total / MIB:.2f} MiB is over {limit_mib} MiB")


def stub(dirpath, name, ver):
    """A wheel with a name and a version, nothing else: a stand-in for pip's resolver."""
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{ver}"
    path = Path(dirpath, f"{dist}-py3-none-any.whl")
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n"
    wheel = "Wheel-Version: 1.0\nGenerator: wheels.sh\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", wheel)
        z.writestr(f"{dist}.dist-info/RECORD", "")


def check_records():
    """Every member of every wheel against its RECORD hash (the LZMA re-compression included)."""
    import base64, csv, hashlib, io
    bad = []
    for f in sorted(WHL.glob("*.whl")):
        with zipfile.ZipFile(f) as z:
            record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
            for row in csv.reader(io.StringIO(z.read(record).decode())):
                if len(row) < 2 or not row[1]:
                    continue
                algo, want = row[1].split("=", 1)
                got = base64.urlsafe_b64encode(hashlib.new(algo, z.read(row[0])).digest())
                if got.rstrip(b"=").decode() != want:
                    bad.append(f"{f.name}: {row[0]}")
    if bad:
        sys.exit(f"wheels.sh --verify: RECORD hash mismatch: {bad}")
    print("wheels.sh --verify: every wheel's members match its RECORD")


def cmd_verify(not_carried, platforms):
    import tomllib
    check_records()
    proj = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + list(proj["optional-dependencies"]["audio"])
    carried = {n: items[0][0] for n, items in wheels().items()}
    prov = provided()
    absent = {canonicalize_name(s.split("==")[0]): s.split("==")[1] for s in pinned(not_carried)}
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp, "stubs")
        stubs.mkdir()
        for name, (ver, _) in prov.items():
            if carried.get(name) != ver:  # a carried copy of the same version is the one used
                stub(stubs, name, ver)
        for name, ver in absent.items():
            stub(stubs, name, ver)
        Path(tmp, "req.txt").write_text("\n".join(reqs) + "\n")
        report = Path(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
               "--report", str(report), "--no-index", "--find-links", str(WHL),
               "--find-links", str(stubs), "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--abi", "cp312", *platforms,
               "--target", str(Path(tmp, "target")), "-r", str(Path(tmp, "req.txt"))]
        print("wheels.sh --verify: resolving omni-train's dependencies + its audio extra "
              f"({len(reqs)} requirements) for cp312 against .whl and provided.txt")
        # Only .whl and the stand-ins: no pip configuration here (find-links, constraints).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        subprocess.run(cmd, check=True, env=dict(env, PIP_CONFIG_FILE=os.devnull))
        chosen = {}
        for item in json.loads(report.read_text())["install"]:
            url = item["download_info"]["url"]
            chosen[canonicalize_name(item["metadata"]["name"])] = (
                item["metadata"]["version"], "whl" if "/stubs/" not in url else "stub")
    problems = []
    for name, ver in carried.items():
        got = chosen.get(name)
        if got != (ver, "whl"):
            problems.append(f"carried {name}=={ver} not chosen (pip chose {got})")
    used_absent = sorted(n for n in absent if n in chosen)
    unused_absent = sorted(n for n in absent if n not in chosen)
    used_prov = sorted(n for n, (v, s) in chosen.items() if s == "stub" and n not in absent)
    assumed = sorted(n for n in used_prov if not prov[n][1].startswith("read"))
    for name in used_prov:
        if chosen[name][0] != prov[name][0]:
            problems.append(f"{name}: pip chose {chosen[name][0]}, the machine has {prov[name][0]}")
    if not problems:
        print(f"  {len(carried)} carried wheels, all chosen at their versions")
    print(f"  {len(used_prov)} of the machine's packages used: {' '.join(used_prov)}")
    print(f"  of those, versions assumed (not read on the machine): {' '.join(assumed)}")
    print(f"  declared but not carried (stand-ins): {' '.join(used_absent)}")
    if unused_absent:
        print(f"  NOT_CARRIED entries nothing requires any more: {' '.join(unused_absent)}")
    if problems:
        sys.exit("wheels.sh --verify: FAIL\n  " + "\n  ".join(problems))
    print("wheels.sh --verify: OK")


def cmd_simulate(sim_dir, platforms):
    """Python 3.11 stand-in of the machine: provided.txt's packages (from this venv; the few
    whose version was read there and differs, from PyPI), the wheels installed with the run
    prefix (cp311 builds of the same versions where .whl holds cp312 ones), then the imports
    and the tiny omni smoke stage on the CPU."""
    import importlib.metadata as md
    import shutil
    sim = Path(sim_dir)
    venv = sim / "venv"
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip())
    prov = provided()
    here = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}
    # Read on the machine, differing from this venv, pure enough to fetch for 3.11: fetch.
    override = [f"{n}=={v}" for n, (v, note) in prov.items()
                if n in ("transformers", "huggingface-hub", "tokenizers", "sentencepiece")
                and n in here and here[n].version != v]
    override.append(f"lightning=={prov['lightning'][0]}")  # the machine's (shadowed) lightning
    skip = {canonicalize_name(s.split("==")[0]) for s in override}
    linked = 0
    for name in prov:
        if name in skip or name not in here:
            continue
        base = Path(here[name].locate_file(""))
        for rel in here[name].files or []:
            src = (base / rel).resolve()
            if not src.is_file():
                continue
            try:
                dst = vsite / src.relative_to(base.resolve())
            except ValueError:
                continue  # scripts and data outside site-packages
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(src)
                linked += 1
    print(f"simulate: {linked} files of {len([n for n in prov if n in here and n not in skip])} "
          f"provided distributions linked; fetching {override}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--target", str(vsite), "--upgrade", *override], check=True)
    # The carried wheels: cp311 builds of the same versions where .whl has cp312-only ones.
    ok311 = supported((3, 11))
    todo, local = [], []
    for f in sorted(WHL.glob("*.whl")):
        name, ver, _, wtags = parse_wheel_filename(f.name)
        (local.append(str(f)) if wtags & ok311 else todo.append(f"{name}=={ver}"))
    cp311 = sim / "cp311"
    cp311.mkdir(parents=True, exist_ok=True)
    if todo:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.11", "--implementation",
                        "cp", "--abi", "cp311", *platforms, "-d", str(cp311), *todo], check=True)
    want = {canonicalize_name(t.split("==")[0]): t.split("==")[1] for t in todo}
    for f in sorted(cp311.glob("*.whl")):
        name, ver, _, _ = parse_wheel_filename(f.name)
        if want.get(name) == str(ver):
            local.append(str(f))
    target = sim / "site"
    if target.exists():
        shutil.rmtree(target)
    print(f"simulate: installing {len(local)} wheels ({len(todo)} as cp311 builds) as a run does")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                    *local], check=True, env=dict(clean, PIP_CONFIG_FILE=os.devnull))
    env = dict(os.environ, PYTHONPATH=f"{target}:{os.getcwd()}", PYTHONNOUSERSITE="1")
    env.pop("VIRTUAL_ENV", None)
    probe = (
        "import importlib, importlib.metadata as md\n"
        "import omni_train.model.audio, megatron.core, megatron.energon, hydra\n"
        "from nemo.collections.asr.modules import ConformerEncoder, AudioToMelSpectrogramPreprocessor\n"
        "from omni_train.config.model import AudioConfig\n"
        "enc = omni_train.model.audio.AudioEncoder(AudioConfig(num_layers=2, d_model=32, num_heads=2, subsampling_conv_channels=16))\n"
        "for m in ('lightning','typing_extensions','transformers','huggingface_hub','nemo','megatron.core','av','torch'):\n"
        "    mod = importlib.import_module(m)\n"
        "    print(f'  {m:18} {getattr(mod, \"__version__\", \"\"):12} {mod.__file__}')\n"
        "print('  AudioEncoder params:', sum(p.numel() for p in enc.parameters()))\n"
    )
    print("simulate: imports")
    subprocess.run([str(vpy), "-c", probe], check=True, env=env)
    synth, run = sim / "synthetic", sim / "smoke"
    shutil.rmtree(run, ignore_errors=True)
    py = [str(vpy), "-m", "omni_train.cli"]
    print("simulate: data synth + 2 steps of stage=smoke_omni_gpu on the CPU (world size 1)")
    if not (synth / ".done").exists():
        subprocess.run([*py, "data", "synth", "--out", str(synth), "--samples", "64", "--seed",
                        "0"], check=True, env=env)
        (synth / ".done").touch()
    subprocess.run([*py, "run", "--no-plan", "--nproc-per-node", "1", "stage=smoke_omni_gpu",
                    "model=tiny", "parallel=single", f"data.synthetic_root={synth}",
                    f"checkpoint.output_dir={run}", "trainer.train_steps=2",
                    "trainer.eval_iters=0"], check=True, env=dict(env, OMNI_TRAIN_PLATFORM="cpu"))
    m = json.loads((run / "manifest.json").read_text())
    print(f"simulate: OK: status {m.get('status')}, step {m.get('step')}, "
          f"final loss {m.get('final_loss')}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "pins":
        print("\n".join(pinned(args)))
    elif cmd == "plan":
        cmd_plan(args)
    elif cmd == "repack":
        cmd_repack()
    elif cmd == "tags":
        cmd_tags(args)
    elif cmd == "size":
        cmd_size(float(args[0]))
    elif cmd == "verify":
        sep = args.index("--")
        cmd_verify(args[:sep], args[sep + 1:])
    elif cmd == "simulate":
        cmd_simulate(args[0], args[1:])
PYEOF
export WHL
helper() { "$PY" -c "$HELPER" "$@"; }

# .whl/ stays out of git (the run tool carries it by name).
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p "$WHL"

specs_txt=$(helper pins "${CARRY[@]}")  # (not `mapfile < <(...)`: a failure must stop us)
mapfile -t specs <<<"$specs_txt"
todo_txt=$(helper plan "${specs[@]}")
todo=()
if [[ -n $todo_txt ]]; then mapfile -t todo <<<"$todo_txt"; fi
binary=()
for spec in "${todo[@]}"; do
  name=${spec%%==*}
  if [[ " ${SDIST_ONLY[*]} " == *" $name "* ]]; then
    echo "wheels.sh: building $spec from its sdist"
    "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$WHL" "$spec"
  else
    binary+=("$spec")
  fi
done
if ((${#binary[@]})); then
  echo "wheels.sh: downloading ${#binary[@]} wheels for cp312 manylinux x86_64"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 "${PLATFORMS[@]}" -d "$WHL" "${binary[@]}" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
fi
helper repack
helper tags "${CARRY[@]}"
if ((VERIFY)); then helper verify "${NOT_CARRIED[@]}" -- "${PLATFORMS[@]}"; fi
if ((SIMULATE)); then helper simulate "$SIM_DIR" "${PLATFORMS[@]}"; fi
helper size "$LIMIT_MIB"
