import subprocess
import sys


def test_importing_all_of_lib_does_not_import_ray():
    code = ("import pkgutil, importlib, sys, lib\n"
            "for m in pkgutil.walk_packages(lib.__path__, 'lib.'): importlib.import_module(m.name)\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
