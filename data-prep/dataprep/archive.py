"""Official IWSLT archives: fetch, verify, read members (train.tags and xml sets)."""
import os
import re
import shutil
import tarfile
import urllib.request

from .common import PrepError, log, sha256

# sha256 of archives we have seen; a mismatch is warned about, an unknown archive is only reported.
KNOWN_SHA256 = {}

SEG = re.compile(r'<seg id="?\d+"?>\s*(.*?)\s*</seg>')


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
    digest = sha256(path)
    known = KNOWN_SHA256.get(os.path.basename(path))
    if known and known != digest:
        log(f"warning: {path} sha256 {digest} differs from the known {known}")
    else:
        log(f"archive {path}: sha256 {digest}")
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
    return data.decode("utf-8").splitlines()


def train_tags_lines(lines, drop_prefixes):
    """train.tags: drop metadata lines (e.g. <url>, <talkid>), strip <title>/<description> tags."""
    out = []
    for line in lines:
        if any(p in line for p in drop_prefixes):
            continue
        for tag in ("<title>", "</title>", "<description>", "</description>"):
            line = line.replace(tag, "")
        out.append(line)
    return out


def xml_segments(lines):
    """Lines with '<seg id' in an IWSLT xml set, the segment text only (fairseq's grep/sed)."""
    out = []
    for line in lines:
        if "<seg id" not in line:
            continue
        match = SEG.search(line)
        text = match.group(1) if match else re.sub(r"\s*</seg>\s*", "", re.sub(r'<seg id="?\d+"?>\s*', "", line))
        out.append(text.replace("\u2019", "'"))
    return out
