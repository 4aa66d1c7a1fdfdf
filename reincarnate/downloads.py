"""Downloading teachers: from the ``rl_checkpoints`` bucket (or a mirror, ``REINCARNATE_BUCKET_URL``) into the cache
(``REINCARNATE_CACHE``), only what the picked checkpoint needs, resumable (``.part`` files, HTTP Range), every file
checked against the listing's size, md5 and crc32c before it gets its final name (:func:`download_teacher`,
:func:`download_gs`, :func:`list_bucket`); and one file of a Hugging Face Hub repo (``hf://``, :func:`download_hf`)."""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

import google_crc32c

from reincarnate.dopamine_checkpoints import _SENTINEL, _pick_iteration, _tf_checkpoint_file_hint
from reincarnate.envs import game_from_env_id
from reincarnate.errors import DownloadError, TeacherError, _one_line
from reincarnate.saved_models import MODEL_SUFFIX


# ----------------------------------------------------------------------------
# Downloading from the bucket
# ----------------------------------------------------------------------------
BUCKET = "rl_checkpoints"
DEFAULT_BUCKET_URL = "https://storage.googleapis.com"
BUCKET_URL_ENV = "REINCARNATE_BUCKET_URL"
CACHE_ENV = "REINCARNATE_CACHE"
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$REINCARNATE_CACHE`` or ``~/.cache/reincarnate``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reincarnate").expanduser()


def _base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(BUCKET_URL_ENV) or DEFAULT_BUCKET_URL).rstrip("/")


def _unreachable(base: str, reason: Any) -> DownloadError:
    return DownloadError(
        f"cannot reach the teacher bucket at {base} ({reason}); copy the run folder (gs://{BUCKET}/DQN_400/<Game>/<run>/) elsewhere "
        f"and pass its local path (e.g. --teacher-checkpoint /data/DQN_400/Breakout/1), or set {BUCKET_URL_ENV} to a mirror"
    )


def _open(url: str, base: str, what: str, headers: Mapping[str, str] | None = None, timeout: float = 60.0) -> Any:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise DownloadError(f"{what} not found in the bucket (HTTP 404 for {url}); check the game, run and iteration") from None
        raise DownloadError(f"{what}: HTTP {e.code} {e.reason} from {url}; try again later or use a mirror ({BUCKET_URL_ENV})") from None
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(base, getattr(e, "reason", e)) from None


def list_bucket(prefix: str, *, base_url: str | None = None, bucket: str = BUCKET) -> list[dict]:
    """Every object under ``prefix`` (GCS JSON listing API, all pages)."""
    base = _base_url(base_url)
    items: list[dict] = []
    token = None
    while True:
        query = {"prefix": prefix, **({"pageToken": token} if token else {})}
        url = f"{base}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
        with _open(url, base, f"listing of gs://{bucket}/{prefix}") as r:
            try:
                page = json.loads(r.read())
            except (ValueError, OSError) as e:
                raise DownloadError(f"the listing of gs://{bucket}/{prefix} from {base} is not valid JSON ({e}); is {BUCKET_URL_ENV} a GCS endpoint?") from None
        items.extend(page.get("items", []))
        token = page.get("nextPageToken")
        if not token:
            return items


def _download_object(item: Mapping[str, Any], dest: Path, base: str, bucket: str, progress: bool, retries: int = 5) -> Path:
    """Stream one object to ``dest.part``, resume with Range, verify, rename."""
    name = item["name"]
    size = int(item.get("size", -1))
    if dest.is_file() and (size < 0 or dest.stat().st_size == size):
        return dest  # verified when it was renamed into place
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = f"{base}/{bucket}/{urllib.parse.quote(name, safe='/')}"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=size if size >= 0 else None, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(name).name, file=sys.stderr, leave=False)
    try:
        attempt = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if size >= 0 and have > size:  # a stale part from another version of the object
                part.unlink()
                have = 0
            if bar is not None:
                bar.reset(total=size if size >= 0 else None)
                bar.update(have)
            if size >= 0 and have == size:
                break
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with _open(url, base, f"gs://{bucket}/{name}", headers) as r:
                    if have and r.status != 206:  # server ignored Range: start over
                        have = 0
                    with open(part, "ab" if have else "wb") as f:
                        while chunk := r.read(_CHUNK):
                            f.write(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                if size < 0 or part.stat().st_size >= size:
                    break
                raise ConnectionError("connection closed early")
            except (ConnectionError, TimeoutError, http.client.HTTPException) as e:
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"download of gs://{bucket}/{name} kept failing ({e}); run the same command again to resume from {part}") from None
                time.sleep(min(0.2 * 2**attempt, 5.0))
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DownloadError(f"disk full while writing {part}; free space or set {CACHE_ENV} (or --cache-dir) to a larger disk, then run again to resume") from None
                raise
    finally:
        if bar is not None:
            bar.close()
    _verify(part, item, bucket)
    os.replace(part, dest)
    return dest


def _verify(part: Path, item: Mapping[str, Any], bucket: str) -> None:
    """Check size, md5 and crc32c against the listing; delete the part on mismatch."""
    name = item["name"]
    problem = None
    size = int(item.get("size", -1))
    if size >= 0 and part.stat().st_size != size:
        problem = f"size {part.stat().st_size} != {size}"
    else:
        md5 = hashlib.md5()
        crc = google_crc32c.Checksum()
        with open(part, "rb") as f:
            while chunk := f.read(_CHUNK * 8):
                md5.update(chunk)
                crc.update(chunk)
        if "md5Hash" in item and base64.b64encode(md5.digest()).decode() != item["md5Hash"]:
            problem = "md5 mismatch"
        elif "crc32c" in item and base64.b64encode(crc.digest()).decode() != item["crc32c"]:
            problem = "crc32c mismatch"
    if problem:
        part.unlink(missing_ok=True)
        raise DownloadError(f"gs://{bucket}/{name} failed verification ({problem}); the partial file was deleted, run again to download it afresh")


def _replay_wanted(rel: str, iteration: int) -> bool:
    base = rel.rsplit("/", 1)[-1]
    if rel.startswith("checkpoints/"):
        return bool(re.search(rf"_ckpt\.{iteration}\.gz$", base))
    if rel.startswith("replay_logs/"):
        return bool(re.search(rf"_ckpt\.{(iteration + 1) // 4}\.gz$", base))
    return False


@dataclasses.dataclass
class _RunPlan:
    """A listed run prefix and the checkpoint picked in it (nothing big fetched yet)."""

    base: str
    bucket: str
    prefix: str
    local_root: Path
    objects: dict[str, dict]
    """Relative object name -> listing item."""
    kind: str
    iteration: int

    def checkpoint_files(self) -> list[str]:
        """Relative names of the files the picked checkpoint needs."""
        it = self.iteration
        wanted = [f"checkpoints/{_SENTINEL}{it}"]
        if self.kind == "tf":
            wanted += ["checkpoints/checkpoint", f"checkpoints/tf_ckpt-{it}.index", f"checkpoints/ckpt.{it}"]
            wanted += [r for r in self.objects if re.fullmatch(rf"checkpoints/tf_ckpt-{it}\.data-\d{{5}}-of-\d{{5}}", r)]
        else:
            wanted.append(f"checkpoints/ckpt.{it}")
        return wanted

    def download(self, rels: Iterable[str], progress: bool) -> None:
        for r in dict.fromkeys(rels):
            if r in self.objects:
                _download_object(self.objects[r], self.local_root / r, self.base, self.bucket, progress)


def _plan_prefix(prefix: str, cache_dir: Path, iteration: int | None, base_url: str | None, bucket: str = BUCKET) -> _RunPlan:
    """List a run prefix and pick its checkpoint iteration, as downloads do."""
    prefix = prefix.strip("/") + "/"
    base = _base_url(base_url)
    items = list_bucket(prefix, base_url=base, bucket=bucket)
    if not items:
        raise TeacherError(f"nothing at gs://{bucket}/{prefix} (on {base}); check the game name (CamelCase, e.g. SpaceInvaders) and the run number")
    rel = {it["name"][len(prefix) :]: it for it in items}
    ckpt_names = {r.split("/", 1)[1] for r in rel if r.startswith("checkpoints/") and r.count("/") == 1}
    hint = None
    if "checkpoints/checkpoint" in rel:  # tiny: fetch it first so the TF hint is known
        _download_object(rel["checkpoints/checkpoint"], cache_dir / bucket / prefix / "checkpoints/checkpoint", base, bucket, False)
        hint = _tf_checkpoint_file_hint(cache_dir / bucket / prefix / "checkpoints")
    kind, it = _pick_iteration(ckpt_names, f"gs://{bucket}/{prefix}checkpoints/", iteration, hint)
    return _RunPlan(base, bucket, prefix, cache_dir / bucket / prefix, rel, kind, it)


def _download_prefix(prefix: str, cache_dir: Path, iteration: int | None, base_url: str | None, include_replay: bool, progress: bool, bucket: str = BUCKET) -> Path:
    plan = _plan_prefix(prefix, cache_dir, iteration, base_url, bucket)
    wanted = plan.checkpoint_files()
    if include_replay:
        wanted += [r for r in plan.objects if _replay_wanted(r, plan.iteration)]
    plan.download(wanted, progress)
    return plan.local_root


def download_teacher(
    game: str,
    run: int = 1,
    iteration: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    include_replay: bool = False,
    progress: bool = True,
    agent: str = "DQN_400",
) -> Path:
    """Download a teacher's checkpoint (and optionally its replay) from the bucket.

    ``game`` is the bucket's CamelCase name (``"Breakout"``) or an envpool id
    (``"Breakout-v5"``).  Picks the latest complete iteration unless
    ``iteration`` is given, fetches only what that checkpoint needs, and
    returns the local run folder ``<cache>/rl_checkpoints/<agent>/<Game>/<run>/``.
    Interrupted downloads resume; every file is checked against the listing's
    size, md5 and crc32c before it gets its final name.
    """
    game = game_from_env_id(game) if re.search(r"-v\d+$", game) else game
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _download_prefix(f"{agent}/{game}/{run}", cache, iteration, base_url, include_replay, progress)


def download_gs(
    address: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    iteration: int | None = None,
    base_url: str | None = None,
    include_replay: bool = False,
    progress: bool = True,
) -> Path:
    """:func:`download_teacher` for an address ``gs://<bucket>/<run prefix>``."""
    m = re.fullmatch(r"gs://([^/]+)/(.+?)/*", address)
    if not m:
        raise TeacherError(f"{address!r} is not a bucket address; use gs://rl_checkpoints/DQN_400/<Game>/<run>")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _download_prefix(m[2], cache, iteration, base_url, include_replay, progress, bucket=m[1])


# ----------------------------------------------------------------------------
# The Hugging Face Hub: hf://<owner>/<repo>[@<revision>]/<file>
# ----------------------------------------------------------------------------
def download_hf(address: str, cache_dir: str | os.PathLike | None = None, *, base_url: str | None = None) -> Path:
    """Download ``hf://<owner>/<repo>[@<revision>]/<path in the repo>`` with ``huggingface_hub.hf_hub_download``
    into the Hugging Face cache (``cache_dir`` instead, if given; ``base_url`` replaces the Hub endpoint, as
    ``HF_ENDPOINT`` does) and return the local file.  A file already in the cache loads offline."""
    m = re.fullmatch(r"hf://([^/@]+/[^/@]+)(?:@([^/]+))?/(.+)", address)
    if not m:
        raise TeacherError(f"{address!r} is not a Hub file address; use hf://<owner>/<repo>/<file>, e.g. hf://cleanrl/BreakoutNoFrameskip-v4-dqn_atari_jax-seed1/dqn_atari_jax.cleanrl_model")
    repo_id, revision, filename = m[1], m[2], m[3]
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise TeacherError(f"{address} needs huggingface_hub: pip install huggingface_hub") from None
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir).expanduser())
    if base_url is not None:
        kwargs["endpoint"] = base_url.rstrip("/")
    try:
        model = Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, **kwargs))
        if filename.endswith(MODEL_SUFFIX):
            # A student uploaded by --upload-model has its run's args.json (the flags that rebuild its network) and
            # Q probe beside it; fetched from the same commit, they land beside the model in the cache's snapshot.
            commit = model.parents[filename.count("/")].name  # the cache's snapshots/<commit>/<filename>
            folder = filename.rpartition("/")[0]
            for extra in ("args.json", "q_probe.npz"):
                try:
                    hf_hub_download(repo_id=repo_id, filename=f"{folder}/{extra}" if folder else extra, revision=commit, **kwargs)
                except EntryNotFoundError:  # a CleanRL model, or ours without a probe: the loader says what it lacks
                    pass
        return model
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it is one
        raise DownloadError(f"{address}: the Hub cannot be reached and the file is not in the Hugging Face cache; connect (unset HF_HUB_OFFLINE) "
                            f"and run again, or download the file and pass its local path") from None
    except EntryNotFoundError:
        raise DownloadError(f"{address}: no file {filename} in the Hub repo {repo_id} (HTTP 404); check the file name "
                            f"(CleanRL's is <exp_name>.cleanrl_model, e.g. dqn_atari_jax.cleanrl_model)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{address}: the Hub repo {repo_id} has no revision {revision}; pass an existing branch, tag or commit after @") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{address}: no Hub repo {repo_id} (or it is private or gated); check the owner/repo, or log in with `hf auth login`") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"{address}: the Hub answered {_one_line(e)}; try again later") from None
    except (OSError, ValueError) as e:
        raise DownloadError(f"{address}: download failed ({type(e).__name__}: {_one_line(e)})") from None
