#!/usr/bin/env bash
# Issue 25's evidence that a student learns from a teacher, in GPU windows of about 15 minutes (start-up included).
# Each stage is one command of the device tool; its results go to $OUT (default ./evidence) and are committed:
#   teacher  train a Pong-v5 teacher of our own (tabula rasa DQN, 16 envs), then its Dopamine-protocol score.
#            A window that ends first leaves a checkpoint: run the stage again to continue it (--resume).
#   compare  QDagger (DQN student, defaults but the budgets and the env count below) from that teacher against
#            tabula rasa at the same online budget, both runs at once on the one GPU, then report.py's curves.
# TINY=1 runs every stage on budgets a 2-core CPU finishes in minutes (the dry run; nothing it makes is evidence).
# Usage: reincarnate_utils/experiments/pong_evidence.sh teacher|compare [seed ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${1:?usage: pong_evidence.sh teacher|compare [seed ...]}; shift
seeds=${*:-1}
OUT=${OUT:-evidence}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # two runs share the GPU in "compare"
LIMIT=${LIMIT:-480}  # seconds each stage may train before it checkpoints and stops (leaves room for start-up and copying)
if [[ ${TINY:-0} == 1 ]]; then
  TEACHER=(--num-envs 4 --total-timesteps 2000 --learning-starts 500 --eval-frequency 1000 --eval-steps 400 --max-episode-steps 300 --buffer-size 4000)
  STUDENT=(--num-envs 4 --teacher-steps 1000 --offline-steps 64 --offline-eval-frequency 32 --total-timesteps 2000 --learning-starts 500
           --eval-frequency 1000 --eval-steps 400 --max-episode-steps 300 --buffer-size 4000)
else
  # DQN converges on Pong in about 2M agent steps; evaluate every 500k to keep the evaluations' share small.
  TEACHER=(--num-envs 16 --total-timesteps "${TEACHER_STEPS:-2500000}" --eval-frequency 500000)
  STUDENT=(--num-envs 16 --teacher-steps 250000 --offline-steps 100000 --total-timesteps "${STUDENT_STEPS:-500000}" --eval-frequency 50000
           --eval-steps 25000)
fi
common=(--env-id Pong-v5 --save-model --checkpoint-minutes 2)
machine="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo cpu), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

case $stage in
teacher)
  resume=(); [[ -f runs/pong-teacher/args.json ]] && resume=(--resume)
  start=$(date +%s)
  timeout -s TERM -k 60 "$LIMIT" python qdagger_dqn_atari_jax.py --method tabula-rasa --run-name pong-teacher "${common[@]}" "${TEACHER[@]}" \
    "${resume[@]}" 2>&1 | tail -n 40 | tee -a "$OUT/teacher.log" || true  # appended: one block per window
  echo "machine: $machine; wall $(( $(date +%s) - start )) s" | tee -a "$OUT/teacher.log"
  # The run folder a script loads as a teacher (its model, args, probe, eval, logs), without its checkpoints (GBs).
  rm -rf "$OUT/pong-teacher" && tar -C runs --exclude checkpoints --exclude .lock -cf - pong-teacher | tar -C "$OUT" -xf -
  ;;
compare)
  teacher=${TEACHER_DIR:-runs/pong-teacher}
  [[ -f $teacher/final_eval.json ]] || { echo "error: no finished teacher at $teacher (run the teacher stage first)" >&2; exit 1; }
  start=$(date +%s)
  for seed in $seeds; do
    for method in qdagger tabula-rasa; do
      name=pong-$method-$seed; resume=(); [[ -f runs/$name/args.json ]] && resume=(--resume)
      timeout -s TERM -k 60 "$LIMIT" python qdagger_dqn_atari_jax.py --method "$method" --seed "$seed" --run-name "$name" \
        --teacher-checkpoint "$teacher" "${common[@]}" "${STUDENT[@]}" "${resume[@]}" > "$OUT/$name.log" 2>&1 &
    done
  done
  wait || true
  echo "machine: $machine; wall $(( $(date +%s) - start )) s" | tee "$OUT/compare.log"
  tail -n 3 "$OUT"/pong-*.log | tee -a "$OUT/compare.log"
  python reincarnate_utils/report.py runs/pong-qdagger-* runs/pong-tabula-rasa-* --out "$OUT/report" 2>&1 | tail -n 20 \
    | tee -a "$OUT/compare.log" || true
  ;;
*) echo "error: unknown stage $stage (teacher or compare)" >&2; exit 2 ;;
esac
