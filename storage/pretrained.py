"""Released weights by name, as official DiT's download.py: fetched once into a cache folder, checked, then loaded.

    python sample.py --model DiT-XL/2 --image-size 256        # no --ckpt: the released DiT-XL/2 of that size
    python sample.py --ckpt DiT-XL-2-512x512.pt                # a released file by name (model and size follow)
    python sample.py --ckpt 64x64_diffusion.pt                 # guided-diffusion's class-conditional ImageNet 64 ADM

Cache folder: `pretrained_models/` under the working directory, as official DiT, so a file its download.py
(or a user following its README) already put there is used as is, and multi-GB weights land on the project's
file system rather than in a home directory's small quota. --pretrained-dir or DTR_PRETRAINED_DIR move it.
Mirror: --pretrained-url or DTR_PRETRAINED_URL is a base URL under which the files sit by name
({base}/DiT-XL-2-256x256.pt); by default each file comes from where its authors published it.

A download streams into a temp file beside its target (foundation/atomic_file.py) while its SHA-256 is computed;
only a complete file (Content-Length reached, HTTP's own framing intact, the first bytes of a torch.save
file) whose hash matches the table is renamed into place, so an interrupted or corrupt transfer leaves nothing behind. Concurrent processes (the
ranks of a torchrun job) take turns on the cache folder (flock), so the file is fetched once.

The authors publish no SHA-256 for these files, and none could be found elsewhere: their table entries say
None and are not invented. For those, the transfer is checked for completeness and format only, and the
SHA-256 computed on download is printed, to compare with a colleague's copy and to pin here.
"""
import fcntl
import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from foundation.atomic_file import atomic_write
from foundation.usage_error import UsageError
from launch.cli import make_output_dir

CACHE_DIR_ENV, MIRROR_ENV = "DTR_PRETRAINED_DIR", "DTR_PRETRAINED_URL"
DEFAULT_CACHE_DIR = "pretrained_models"  # official DiT's folder
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60  # per socket operation, not for the whole transfer
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80\x02")  # a torch.save zip archive; a torch < 1.6 pickle


@dataclass(frozen=True)
class PretrainedFile:
    """A released checkpoint: where its authors publish it, its SHA-256 (None: none published) and what it holds."""
    url: str
    sha256: str
    model: str
    image_size: int


PRETRAINED = {
    # Peebles & Xie, facebookresearch/DiT (download.py, README): EMA weights of DiT-XL/2, 7M steps
    "DiT-XL-2-256x256.pt": PretrainedFile("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
                                          None, "DiT-XL/2", 256),
    "DiT-XL-2-512x512.pt": PretrainedFile("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
                                          None, "DiT-XL/2", 512),
    # Dhariwal & Nichol, openai/guided-diffusion (README): class-conditional ImageNet 64x64 ADM
    "64x64_diffusion.pt": PretrainedFile(
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_diffusion.pt", None, "ADM-ImageNet64", 64),
}


class DownloadFailed(Exception):
    """The transfer itself failed (network, HTTP status, short or damaged body); its message is the reason."""


#################################################################################
#                                Names to files                                 #
#################################################################################

def released_name(model, image_size):
    """File name of the released weights of --model at --image-size, or None. Official DiT's defaults: DiT-XL/2,
    256 px; a model released at one size only (ADM-ImageNet64) needs no --image-size."""
    matches = [name for name, entry in PRETRAINED.items()
               if entry.model == (model or "DiT-XL/2") and image_size in (None, entry.image_size)]
    if len(matches) > 1:
        matches = [name for name in matches if PRETRAINED[name].image_size == 256]
    return matches[0] if matches else None


def add_pretrained_arguments(parser):
    """--pretrained-dir and --pretrained-url (sample.py, sample_ddp.py)."""
    parser.add_argument("--pretrained-dir", type=str, default=None,
                        help=f"cache of released weights (--ckpt DiT-XL-2-256x256.pt, 64x64_diffusion.pt); default "
                             f"${CACHE_DIR_ENV} or ./{DEFAULT_CACHE_DIR} as official DiT")
    parser.add_argument("--pretrained-url", type=str, default=None,
                        help=f"a mirror's base URL holding the released files by name; default ${MIRROR_ENV} or "
                             "where their authors publish them")
    return parser


def use_pretrained(args):
    """Point args.ckpt at local files: released names are fetched into the cache (once); fills --model and
    --image-size for them. Without --ckpt, the released weights of --model / --image-size, as official DiT.

    Changes args in place; a path that exists is used as given, other paths are left for the loader to judge.
    """
    if args.ckpt is None:
        name = released_name(args.model, args.image_size)
        if name is None:
            released = ", ".join(f"{entry.model} at {entry.image_size} px" for entry in PRETRAINED.values())
            size = f" at {args.image_size} px" if args.image_size is not None else ""
            raise UsageError(f"--ckpt is required: no released weights of --model {args.model or 'DiT-XL/2'}{size} "
                             f"(released: {released})")
        args.ckpt = [name]
    paths = [args.ckpt] if isinstance(args.ckpt, str) else list(args.ckpt)
    cache_dir = args.pretrained_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    mirror = args.pretrained_url or os.environ.get(MIRROR_ENV)
    for i, path in enumerate(paths):
        if os.path.exists(path) or path not in PRETRAINED:
            continue
        entry = PRETRAINED[path]
        for flag, value in (("model", entry.model), ("image_size", entry.image_size)):
            given = getattr(args, flag)
            if given is not None and given != value:
                raise UsageError(f"--{flag.replace('_', '-')} {given} does not fit {path}, the released "
                                 f"{entry.model} at {entry.image_size} px")
            setattr(args, flag, value)
        paths[i] = fetch(path, cache_dir, mirror)
    args.ckpt = paths
    return args


#################################################################################
#                                   Download                                    #
#################################################################################

def fetch(name, cache_dir, mirror=None):
    """Path of released file `name` in cache_dir, downloaded (checked, atomically) if it is not there yet."""
    entry = PRETRAINED[name]
    target = os.path.join(cache_dir, name)
    if os.path.isfile(target):
        return target
    url = f"{mirror.rstrip('/')}/{name}" if mirror else entry.url
    created = not os.path.isdir(cache_dir)
    make_output_dir(cache_dir, "--pretrained-dir")
    folder = os.open(cache_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # other ranks wait here, then find the file in place
        if not os.path.isfile(target):
            digest = download(url, target, entry.sha256)
            if entry.sha256 is None:
                print(f"{target}: SHA-256 {digest} (its authors publish no hash to check it against; compare it "
                      f"with another copy, and pin it in storage/pretrained.py)", file=sys.stderr)
    except DownloadFailed as error:
        if created:
            _remove_if_empty(cache_dir)
        raise UsageError(f"cannot download {name} from {url}: {error}; nothing was kept. Download {entry.url} to "
                         f"{target} yourself (or give its path with --ckpt), or name a mirror with --pretrained-url / "
                         f"{MIRROR_ENV}") from None
    finally:
        os.close(folder)  # releases the lock
    return target


def download(url, target, sha256=None):
    """Stream url into `target` atomically; returns the SHA-256 hex digest. DownloadFailed if the transfer is
    short, fails, is not a whole torch.save file, or (sha256 given) has another hash; nothing is left then."""
    digest, head = hashlib.sha256(), bytearray()

    def write(f):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                expected = response.headers.get("Content-Length")
                received = _copy(response, f, digest, head, progress_total=int(expected) if expected else None)
        except urllib.error.HTTPError as error:  # before URLError: it is one
            raise DownloadFailed(f"HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:  # no network, name not resolved, connection refused
            raise DownloadFailed(f"{error.reason}") from None
        except (http.client.HTTPException, ConnectionError, socket.timeout) as error:
            raise DownloadFailed(f"the connection broke off ({type(error).__name__}: {error})") from None
        if expected is not None and received != int(expected):
            raise DownloadFailed(f"the connection broke off after {received:,} of {int(expected):,} bytes")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DownloadFailed(f"the file's SHA-256 is {digest.hexdigest()}, not the released {sha256} "
                                 f"(a damaged transfer or another file)")
        if not head.startswith(TORCH_FILE_STARTS):  # e.g. a proxy's HTML page served with status 200
            raise DownloadFailed(f"what arrived is not a torch.save file (it starts with {bytes(head[:16])!r})")

    atomic_write(target, write)
    return digest.hexdigest()


def _copy(response, f, digest, head, progress_total=None):
    """Copy the response body into f chunk by chunk, hashing it and keeping its first bytes in `head`; returns
    the bytes copied. A progress bar on a terminal only (piped stderr keeps its one-line errors)."""
    from tqdm import tqdm

    received = 0
    with tqdm(total=progress_total, unit="B", unit_scale=True, desc="download", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        while True:
            chunk = response.read(CHUNK_BYTES)
            if not chunk:
                return received
            f.write(chunk)
            digest.update(chunk)
            if len(head) < 16:
                head += chunk[:16 - len(head)]
            received += len(chunk)
            bar.update(len(chunk))


def _remove_if_empty(folder):
    """Remove a cache folder this call created, if a failed download left it empty."""
    try:
        os.rmdir(folder)
    except OSError:
        pass
