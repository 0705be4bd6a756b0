"""The server's settings and its command line: where it listens, which model, where jobs live, the limits, and
who may call it. Parsing and checking only; `ldm.serve.main` runs the server."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo" / "digits.yaml"
KEYS_ENV = "LDM_API_KEYS"  # comma-separated Bearer keys
AUTH_ENV = "LDM_API_AUTH"  # comma-separated user:password pairs


class SettingsError(ValueError):
    """A bad flag or an unsafe combination, reported as one line before anything starts."""


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ldm" / "serve"


@dataclass
class Limits:
    """What one request may ask for; each is a flag (`--max_queue` ...)."""

    max_queue: int = 16  # jobs waiting (not counting the running one); full -> 429
    max_pixels: int = 1024 * 1024  # width x height of the output
    max_steps: int = 150
    max_images: int = 8  # images per request: n (batch size) x n_iter
    max_prompt: int = 2000  # characters, prompt and negative prompt each
    max_body: int = 16 * 1024 * 1024  # bytes of a request body
    max_image_pixels: int = 4096 * 4096  # decoded pixels of an uploaded image (decompression bombs)
    job_timeout: float = 600.0  # seconds one job may run


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    config: str = str(DEMO_CONFIG)
    ckpt: str | None = None
    device: str | None = None
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    deepcache: int = 0
    tome: float = 0.0
    vae_tile: int | None = None
    lora_dir: Path = Path("models/lora")  # the LoRAs requests may name (<lora:NAME:W>), as txt2img's --lora_dir
    embeddings_dir: Path = Path("models/embeddings")  # embeddings found by their word in prompts
    taesd: list[str] = field(default_factory=list)  # tiny autoencoder files (vae "taesd", previews); else config's
    threads: int | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    keep: float = 24 * 3600.0  # seconds a finished job and its images are kept
    api_keys: list[str] = field(default_factory=list)
    api_auth: list[tuple[str, str]] = field(default_factory=list)
    insecure_no_auth: bool = False
    cors_origins: list[str] = field(default_factory=list)
    grace: float = 30.0
    forwarded_allow_ips: str | None = None
    limits: Limits = field(default_factory=Limits)
    ray: str | None = None  # Ray Serve (ldm.serve.ray_serve): "" a local Ray, else the cluster's address
    replicas: int = 2  # model replicas on Ray Serve, each with its own worker, sharing the data directory
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    lease: float = 30.0  # seconds a replica's claim on a job lasts without its heartbeat (then another runs it)

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys or self.api_auth)


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '24h', '7d' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 24h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-serve",
        description="Serve one model over HTTP: native jobs (/v1/jobs), AUTOMATIC1111 (/sdapi/v1) and OpenAI "
        "(/v1/images) APIs, one persistent queue. See docs/serving.md.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs --api_key)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--config", default=str(DEMO_CONFIG), help="model config (default: the digits demo)")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the one the config's txt2img section names)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's)")
    p.add_argument("--precision", default=None, help="full, autocast, bf16 or fp16 (default: the config's)")
    p.add_argument("--channels_last", action="store_true", default=None)
    p.add_argument("--no_channels_last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--deepcache", type=int, default=0, metavar="N", help="as txt2img's, for every job")
    p.add_argument("--tome", type=float, default=0.0, metavar="RATIO", help="as txt2img's, for every job")
    p.add_argument("--vae_tile", type=int, default=None, metavar="PIXELS", help="as txt2img's, for every job")
    p.add_argument("--lora_dir", type=Path, default=Path("models/lora"), help="LoRAs requests may name (<lora:NAME:W>)")
    p.add_argument("--embeddings_dir", type=Path, default=Path("models/embeddings"), help="embeddings prompts may use")
    p.add_argument(
        "--taesd", action="append", default=[], metavar="PATH",
        help="tiny autoencoder files for requests' vae 'taesd' and step previews (default: the config's taesd:)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: CPU cores - 1)")
    p.add_argument("--data_dir", type=Path, default=None, help=f"jobs database and images ({default_data_dir()})")
    p.add_argument("--keep", type=parse_duration, default=24 * 3600.0, help="keep finished jobs this long (24h)")
    p.add_argument("--api_key", action="append", default=[], help=f"a Bearer key (repeatable; also ${KEYS_ENV})")
    p.add_argument("--api_key_file", type=Path, default=None, help="a file of Bearer keys, one per line")
    p.add_argument(
        "--api_auth", action="append", default=[], help=f"user:password for HTTP Basic (repeatable; also ${AUTH_ENV})"
    )
    p.add_argument("--insecure_no_auth", action="store_true", help="allow a non-loopback --host without any key")
    p.add_argument("--cors_origin", action="append", default=[], help="allow this browser origin (CORS; off)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for the running job")
    p.add_argument(
        "--forwarded_allow_ips",
        default=None,
        help="proxies whose X-Forwarded-* headers are trusted (behind a reverse proxy, e.g. 127.0.0.1)",
    )
    g = p.add_argument_group("Ray Serve (pip install -e '.[ray]'; docs/scaling.md)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="serve on Ray Serve: alone, a new local Ray instance; 'auto' or ray://HOST:10001, a running "
                        "cluster")  # fmt: skip
    g.add_argument("--replicas", type=int, default=2, help="model replicas (each runs jobs; --ray only)")
    g.add_argument("--cpus_per_replica", type=float, default=1.0, help="CPUs Ray reserves for each replica")
    g.add_argument("--gpus_per_replica", type=float, default=0.0, help="GPUs Ray reserves for each replica")
    g.add_argument("--lease", type=parse_duration, default=30.0,
                   help="a replica's claim on a job lapses this long after its last heartbeat")  # fmt: skip
    d = Limits()
    p.add_argument("--max_queue", type=int, default=d.max_queue, help="jobs waiting; full -> 429")
    p.add_argument("--max_pixels", type=int, default=d.max_pixels, help="width x height of an output image")
    p.add_argument("--max_steps", type=int, default=d.max_steps)
    p.add_argument("--max_images", type=int, default=d.max_images, help="images per request (n x n_iter)")
    p.add_argument("--max_prompt", type=int, default=d.max_prompt, help="characters per prompt")
    p.add_argument("--max_body", type=int, default=d.max_body, help="bytes per request body")
    p.add_argument("--max_image_pixels", type=int, default=d.max_image_pixels, help="pixels of an uploaded image")
    p.add_argument("--job_timeout", type=parse_duration, default=d.job_timeout, help="time limit of one job")
    return p


def read_keys(opt: argparse.Namespace) -> tuple[list[str], list[tuple[str, str]]]:
    keys = [k for k in opt.api_key if k]
    keys += [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if opt.api_key_file is not None:
        try:
            lines = opt.api_key_file.read_text().splitlines()
        except OSError as e:
            raise SettingsError(f"cannot read --api_key_file {opt.api_key_file}: {e.strerror or e}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    pairs = []
    for text in [*opt.api_auth, *[a for a in os.environ.get(AUTH_ENV, "").split(",") if a.strip()]]:
        user, sep, password = text.strip().partition(":")
        if not sep or not user or not password:
            raise SettingsError("--api_auth takes user:password (both non-empty)")
        pairs.append((user, password))
    return keys, pairs


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from flags and environment; SettingsError for what must not start (e.g. an open public port)."""
    opt = build_parser().parse_args(argv)
    keys, pairs = read_keys(opt)
    limits = Limits(**{f.name: getattr(opt, f.name) for f in fields(Limits)})  # each limit is a flag of its name
    for name, value in vars(limits).items():
        if value <= 0:
            raise SettingsError(f"--{name} must be positive, got {value}")
    same_name = {f.name: getattr(opt, f.name) for f in fields(Settings) if hasattr(opt, f.name)}
    s = Settings(**{
        **same_name,  # a flag --NAME sets the setting NAME, but for these:
        "data_dir": opt.data_dir or default_data_dir(),
        "api_keys": keys,
        "api_auth": pairs,  # the flag's "user:password" texts, parsed
        "cors_origins": opt.cors_origin,
        "limits": limits,
    })  # fmt: skip
    if s.replicas < 1 or s.cpus_per_replica < 0 or s.gpus_per_replica < 0 or s.lease <= 0:
        raise SettingsError("--replicas must be at least 1, --cpus/--gpus_per_replica >= 0 and --lease positive")
    check_exposure(s)
    from ldm.speed.runtime import PRECISIONS  # imports torch: only once the cheap checks have passed

    if s.precision is not None and s.precision not in PRECISIONS:
        raise SettingsError(f"--precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if not os.path.isfile(s.config):
        raise SettingsError(f"config file not found: {s.config}")
    return s


def check_exposure(s: Settings) -> None:
    """Refuse to listen beyond this machine with no key at all, unless told so in as many words."""
    if not is_loopback(s.host) and not s.auth_required and not s.insecure_no_auth:
        raise SettingsError(
            f"refusing to serve on {s.host} without authentication: give --api_key (or --api_auth user:password), "
            "or --insecure_no_auth if the network is trusted"
        )
