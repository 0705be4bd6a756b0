from pathlib import Path

from setuptools import find_packages, setup


def requirements(name: str) -> list[str]:
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="ldm",
    version="0.1.0",
    description="Stable Diffusion v1 latent diffusion, reimplemented: loads the original checkpoints, "
    "gives the original's images",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={
        "ldm.speed.native": ["*.cpp"],  # compiled on first use (ldm/speed/native/__init__.py)
        "ldm.serve": ["web/*.html", "web/*.js", "web/*.css"],  # the web page (ldm/serve/api_web.py)
    },
    python_requires=">=3.10",
    install_requires=requirements("requirements.txt"),
    extras_require={"test": requirements("requirements-test.txt"), "ray": requirements("requirements-ray.txt")},
    entry_points={
        "console_scripts": [
            "ldm-txt2img = ldm.cli.txt2img:main",
            "ldm-img2img = ldm.cli.img2img:main",
            "ldm-serve = ldm.serve.main:main",
            "ldm-batch = ldm.batch.run:main",
        ]
    },
)
