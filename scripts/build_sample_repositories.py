"""Build data/samples/repositories.jsonl: three small standard-library packages as repositories."""

from __future__ import annotations

import json
import sys
import sysconfig
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
PACKAGES = ("json", "tomllib", "zoneinfo")
EXCLUDED_DIRS = frozenset({"tests", "test", "__pycache__"})


def package_files(package_dir: Path) -> dict[str, str]:
    """Relative path -> text of every source file of a package, tests and caches left out."""
    files = {}
    for path in sorted(package_dir.rglob("*")):
        relative = path.relative_to(package_dir)
        if not path.is_file() or EXCLUDED_DIRS.intersection(relative.parts[:-1]):
            continue
        if path.suffix in {".pyc", ".pyo"}:
            continue
        files[relative.as_posix()] = path.read_text(encoding="utf-8")
    return files


def repository_document(name: str, owner_id: str) -> dict[str, object]:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {
        # Stable ids, so that rebuilding the file gives the same documents.
        "_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/python/cpython/{name}")),
        "name": name,
        "link": f"https://github.com/python/cpython/tree/{version}/Lib/{name}",
        "content": package_files(Path(sysconfig.get_paths()["stdlib"]) / name),
        "owner_id": owner_id,
    }


def main() -> None:
    users = (SAMPLES / "users.jsonl").read_text(encoding="utf-8").splitlines()
    owner_id = json.loads(users[0])["_id"]
    lines = [
        json.dumps(repository_document(name, owner_id), ensure_ascii=False) for name in PACKAGES
    ]
    output = SAMPLES / "repositories.jsonl"
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} repositories to {output.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
