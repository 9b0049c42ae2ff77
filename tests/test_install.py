"""The install: the stack imports on this CPU machine, and the torchvision fix is automatic and inert
where torchvision's extension loads (a GPU cluster)."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code, env_extra=None, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "HVP_TORCHVISION_CPU_SHIM")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_stack_imports_in_a_fresh_interpreter():
    r = run("import timm, deepspeed, webdataset, submitit, nvidia.dali, torch.utils.tensorboard, os;"
            "print(os.environ.get('DS_ACCELERATOR'))", cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    import torch
    if not torch.cuda.is_available():
        assert r.stdout.strip().splitlines()[-1] == "cpu"


def test_timm_models_work_after_the_fix():
    r = run("import timm, torch; m = timm.create_model('resnet18', num_classes=3);"
            "print(m(torch.zeros(1, 3, 64, 64)).shape)", cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch.Size([1, 3])" in r.stdout


def test_installed_hook_is_the_repo_copy():
    site = Path(sysconfig.get_paths()["purelib"])
    assert (site / "_hvp_compat.pth").read_text().strip() == "import _hvp_compat"
    assert (site / "_hvp_compat.py").read_bytes() == (ROOT / "launch" / "torchvision_compat.py").read_bytes(), \
        "re-run scripts/setup_env.sh: the installed hook differs from launch/torchvision_compat.py"


def test_fix_does_nothing_where_torchvision_extension_loads(tmp_path):
    # A torchvision whose _C loads (what a GPU cluster has): the hook must not define any op.
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("LOADED_FAKE = True\n")
    import importlib.machinery
    import torch
    real_lib = Path(torch.__file__).parent / "lib" / "libc10.so"
    shutil.copy(real_lib, pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0]))
    r = run("import torchvision, torch, os\n"
            "assert torchvision.LOADED_FAKE\n"
            "try:\n"
            "    torch._C._dispatch_find_schema_or_throw('torchvision::nms', ''); print('DEFINED')\n"
            "except RuntimeError:\n"
            "    print('UNTOUCHED')\n"
            "print(os.environ.get('HVP_TORCHVISION_CPU_SHIM'))\n",
            env_extra={"PYTHONPATH": str(tmp_path)}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["UNTOUCHED", "None"]


def test_fix_applies_where_extension_cannot_load():
    r = run("import launch.torchvision_compat as c, sys; assert 'torchvision' not in sys.modules;"
            "print(c.torchvision_extension_loads())", cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    import torch
    if torch.version.cuda is None:  # this CPU machine: the CUDA torchvision cannot load
        assert r.stdout.strip() == "False"


def test_deepspeed_accelerator_respected_when_set():
    r = run("import deepspeed, os; print(os.environ['DS_ACCELERATOR'])", env_extra={"DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0 and r.stdout.strip().endswith("cpu")
