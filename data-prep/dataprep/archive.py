"""Official IWSLT archives: fetch, open, read members (lines split as perl reads them)."""
import os
import shutil
import tarfile
import urllib.request

from .common import PrepError, log, sha256
from .text import split_lines


def fetch(urls, dest):
    """Download the first URL that answers to dest (via a temporary name)."""
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
    raise PrepError("could not download the archive (" + "; ".join(errors) + "); pass --archive PATH")


def open_archive(path):
    if not os.path.isfile(path):
        raise PrepError(f"archive not found: {path}")
    # No checksum is published for the IWSLT archives, so none is checked: the digest is printed
    # (and recorded by the stage) so that two preparations can be compared.
    log(f"archive {path}: sha256 {sha256(path)} (not verified: no published checksum)")
    try:
        tar = tarfile.open(path, "r:*")
        names = tar.getnames()
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = (str(err).splitlines() or ["unreadable"])[0]
        raise PrepError(f"corrupt or unreadable archive {path}: {reason}") from None
    return tar, names


def read_member(tar, names, suffix, archive_path):
    """Text lines of the member whose path ends with `suffix` (e.g. 'de-en/train.tags.de-en.de')."""
    matches = [n for n in names if n.endswith(suffix)]
    if not matches:
        raise PrepError(f"{archive_path} has no member {suffix}")
    try:
        data = tar.extractfile(matches[0]).read()
    except (tarfile.TarError, OSError, EOFError, AttributeError) as err:
        reason = (str(err).splitlines() or ["unreadable"])[0]
        raise PrepError(f"corrupt member {matches[0]} in {archive_path}: {reason}") from None
    return split_lines(data.decode("utf-8"))
