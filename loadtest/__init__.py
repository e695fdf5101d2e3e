"""Load generator, sweeps, reports and plots for a running leanserve (issue 7).

Modules:

* `arrivals`: open-loop Poisson schedules, prompt sets, the KS statistic.
* `driver`: the async gRPC (and optional OpenAI HTTP) client and the open- and
  closed-loop runners; latency is measured from each request's scheduled send
  time, so a server that stalls cannot hide it (no coordinated omission).
* `sweep`: sweeps over steps, experts, quality tiers and rates, the overload
  scenario, HdrHistogram percentiles, goodput and the cost-model comparison.
* `report`: JSON, CSV, PNG plots and a markdown summary.
* `cli`: `leanserve loadtest` (stdlib-only `add_arguments`, lazy `main`).
* `locustfile`: the same gRPC calls as a Locust user.
* `fuzz`: `python -m loadtest.fuzz`, a bounded fuzzer (hostile gRPC messages and
  raw bytes, hostile HTTP bodies; every response classified, health checked every
  K requests) and a soak mode reporting the replica's RSS (issue 17).

`loadtest/` talks to the server through the generated gRPC stubs and the public
HTTP route only; it never imports the engine. Its gRPC channels carry the retry
policy of `runtime.client.channel_options` (UNAVAILABLE is retried with backoff
before a call's first message); the fuzzer's channel has retries off.
"""
