"""pyproject.toml says what the Comfy registry reads: the supported ComfyUI range (both tested hosts in it),
an icon that exists in the repository, and a LICENSE file that is the license declared."""
import os
import tomllib

from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTED_HOSTS = ("0.3.75", "0.29.0")  # the Makefile's two test runs


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_requires_comfyui_covers_exactly_the_tested_hosts():
    spec = SpecifierSet(_pyproject()["tool"]["comfy"]["requires-comfyui"])
    assert all(v in spec for v in TESTED_HOSTS)
    assert "0.3.74" not in spec and "0.30.0" not in spec  # untested versions are not claimed


def test_icon_is_a_committed_image_the_url_points_at():
    icon = _pyproject()["tool"]["comfy"]["Icon"]
    repo = _pyproject()["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix), icon
    path = os.path.join(ROOT, icon[len(prefix):])
    with open(path, encoding="utf-8") as f:
        svg = f.read()
    assert svg.lstrip().startswith("<svg") and 'viewBox="0 0 256 256"' in svg  # square, as the registry shows it


def test_license_file_is_the_declared_license():
    project = _pyproject()["project"]
    assert project["license"] == {"file": "LICENSE"}
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
