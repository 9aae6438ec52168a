import json, sys
from pathlib import Path
for path in sys.argv[1:]:
    d = json.loads(Path(path).read_text())
    for m, row in d.items():
        if m.startswith("_"): continue
        r = row.get("routing") or []
        own = [round(r[i][i], 2) for i in range(len(r))]
        dev = row.get("dev", {})
        devmean = sum(dev.values())/len(dev) if dev else float("nan")
        last = row["matrix"][-1]
        print(f"{Path(path).stem:14s} {m:10s} devsel {devmean:5.1f} AP {row['AP']:5.1f} F.Ra {row['F.Ra']:5.1f} BWT {row['BWT']:6.1f} last {last} own {own} s {row['seconds']:.0f}")
