"""A stand-in training loop for tests/test_distributed.py's stop-agreement test: under torchrun,
every rank calls distributed.StopAgreement once per "step" (a random sleep of this rank's own, so
ranks run at different speeds and drift), rank REQUESTER starts asking to stop (signal SIGNAL) at
step REQUEST_AT, and each rank writes to OUT/rank<N>.json the step after which it stopped and what
was agreed."""
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from plumbing.distributed import StopAgreement, setup_distributed, teardown_distributed  # noqa: E402

info = setup_distributed("cpu")
agree = StopAgreement(info)
rng = random.Random(info.rank)
requests = {int(rank): (int(at), int(sig)) for rank, at, sig in
            (item.split(":") for item in os.environ["REQUESTS"].split(","))}  # rank:step:signal,...
slowest = float(os.environ.get("STEP_SECONDS", "0.002"))
step, agreed, intervals = 0, 0, []
while step < 5000 and not agreed:
    time.sleep(rng.uniform(0, slowest) * (1 + info.rank))  # rank r is up to r + 1 times slower
    step += 1
    at, sig = requests.get(info.rank, (None, 0))
    agreed = agree(sig if at is not None and step >= at else 0)
    intervals.append(agree.interval)
agree.finish()
with open(os.path.join(os.environ["OUT"], f"rank{info.rank}.json"), "w") as f:
    json.dump({"stopped_after": step, "agreed": agreed, "largest_interval": max(intervals)}, f)
teardown_distributed(barrier=True, info=info)
