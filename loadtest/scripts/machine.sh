#!/usr/bin/env bash
# Prints the machine a benchmark ran on, as one JSON object: cores, CPU model, load right now.
# Other agents compile on this machine while benchmarks run: the load average is part of the result.
cat <<JSON
{"nproc": $(nproc), "cpu": "$(lscpu | sed -n 's/^Model name: *//p' | head -1)", "uptime": "$(uptime | sed 's/^ *//')", "date": "$(date -u +%FT%TZ)", "commit": "$(git rev-parse --short HEAD 2>/dev/null)"}
JSON
