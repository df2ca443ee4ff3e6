"""Copy one collection of a running tandem server, consistently: python backup-collection.py NAME DATA_DIR OUT_DIR

Writes OUT_DIR/NAME, a collection folder to restore by placing it in DATA_DIR/collections/ of a
stopped server. The catalog (SQLite, the commit point) is copied first with SQLite's online
backup API; the vector files after it are append-only, so rows they hold past the catalog's
count are cut off when the copy is opened, and a coarse checkpoint that is missing or ahead of
the catalog is rebuilt from the vectors. The service never compacts a collection (compaction
would replace the vector files), so the server may keep serving and writing meanwhile.
Standard library only: it runs in the image, e.g.
    kubectl -n tandem exec -i tandem-0 -- python - docs /data /data/backups < deploy/backup-collection.py
"""

import shutil
import sqlite3
import sys
from pathlib import Path


def backup(name: str, data_dir: Path, out_dir: Path) -> Path:
    source, target = data_dir / "collections" / name, out_dir / name
    if not (source / "service.json").is_file():
        sys.exit(f"no collection {name!r} under {data_dir / 'collections'}")
    if target.exists():
        sys.exit(f"{target} exists: remove it or choose another OUT_DIR")
    (target / "index").mkdir(parents=True)
    catalog = sqlite3.connect(source / "index" / "catalog.sqlite")
    copy = sqlite3.connect(target / "index" / "catalog.sqlite")
    try:
        catalog.backup(copy)
    finally:
        copy.close()
        catalog.close()
    for path in sorted(source.rglob("*")):
        if path.is_file() and not path.name.startswith("catalog.sqlite"):  # not its -wal, -shm
            shutil.copy2(path, target / path.relative_to(source))
    return target


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(backup(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
