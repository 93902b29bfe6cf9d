"""Official IWSLT archives: fetch, open, read members (lines split as perl reads them)."""
import gzip
import os
import shutil
import tarfile
import urllib.request
import zlib

from .common import PrepError, decode_utf8, log, sha256
from .text import split_lines


def fetch(urls, dest, offline_hint="pass --archive PATH"):
    """Download the first URL that answers to dest (via a temporary name); when none answers, the
    error ends with `offline_hint` (the option that gives a local copy instead)."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    errors = []
    for url in urls:
        try:
            log(f"download: {url}")
            with urllib.request.urlopen(url, timeout=60) as resp, open(dest + ".tmp", "wb") as f:
                shutil.copyfileobj(resp, f)
            os.replace(dest + ".tmp", dest)
            return dest
        except OSError as err:
            errors.append(f"{url}: {err}")
            if os.path.exists(dest + ".tmp"):
                os.remove(dest + ".tmp")
    raise PrepError(f"could not download {os.path.basename(dest)} (" + "; ".join(errors) + f"); {offline_hint}")


def open_archive(path):
    if not os.path.isfile(path):
        raise PrepError(f"archive not found: {path}")
    # No checksum is published for the IWSLT archives, so none is checked: the digest is printed
    # (and recorded by the stage) so that two preparations can be compared.
    log(f"archive {path}: sha256 {sha256(path)} (not verified: no published checksum)")
    try:
        tar = tarfile.open(path, "r:*")
        names = tar.getnames()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise PrepError(f"corrupt or unreadable archive {path}: {why_not_a_tar(path, err)}") from None
    return tar, names


def why_not_a_tar(path, err):
    """What is wrong with a file tarfile could not read, in words (tarfile's own message is several
    lines, one per compression it tried)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        return "empty file"
    if head == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        except EOFError:
            return "the gzip data ends early (an incomplete download?)"
        except (OSError, zlib.error) as gz_err:
            return f"bad gzip data ({gz_err})"
        return "gzip data that is not a tar archive, or a tar archive cut short"
    message = str(err).strip().splitlines()
    return message[0].rstrip(":") if len(message) == 1 else "not a tar archive (plain, gzip, bzip2 or xz)"


def read_member(tar, names, suffix, archive_path):
    """Text lines of the member whose path ends with `suffix` (e.g. 'de-en/train.tags.de-en.de')."""
    matches = [n for n in names if n.endswith(suffix)]
    if not matches:
        raise PrepError(f"{archive_path} has no member {suffix}")
    try:
        data = tar.extractfile(matches[0]).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error, AttributeError) as err:
        reason = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else type(err).__name__
        raise PrepError(f"corrupt member {matches[0]} in {archive_path}: {reason}") from None
    return split_lines(decode_utf8(data, f"member {matches[0]} of {archive_path}"))
