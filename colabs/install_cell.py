# Install jaxformers on a fresh runtime (Colab). Set JAXFORMERS_SOURCE to your copy of the project: a
# local path (a clone, or the folder uploaded to the runtime or mounted from Drive) or a pip URL such as
# "git+https://github.com/<owner>/jaxformers.git" (or the environment variable of that name).
# EXTRA_PACKAGES: what this notebook needs beyond jaxformers (already installed ones are skipped).
import importlib.util, os, pathlib, subprocess, sys

JAXFORMERS_SOURCE = os.environ.get("JAXFORMERS_SOURCE", "")
EXTRA_PACKAGES = {}  # import name -> pip requirement

missing = [req for mod, req in EXTRA_PACKAGES.items() if importlib.util.find_spec(mod) is None]
if importlib.util.find_spec("jaxformers") is None or importlib.util.find_spec("train") is None:
    if not JAXFORMERS_SOURCE:
        raise RuntimeError("jaxformers is not installed here: set JAXFORMERS_SOURCE at the top of this cell to a "
                           "path of a jaxformers checkout or to a pip URL (git+https://github.com/<owner>/jaxformers.git)")
    local = pathlib.Path(JAXFORMERS_SOURCE).expanduser()
    source = local.resolve().as_uri() if local.exists() else JAXFORMERS_SOURCE
    missing.insert(0, f"jaxformers[data] @ {source}")
if missing:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])
