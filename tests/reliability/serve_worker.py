"""A long-lived stand-in for TF Serving: loads a SavedModel once and answers requests.

    python tests/reliability/serve_worker.py SAVED_MODEL_DIR

Like TF Serving, it loads the model with TensorFlow alone (no covidlib import) and calls the
`serving_default` signature with a batch of encoded image bytes per request. Requests are JSON
lines on stdin (a list of base64 strings); each gets one JSON line on stdout:
{"probability": [...]} or {"error": "<TF error class>: <first line of the message>"}. A request
that fails must not end the process; the test checks it serves the next request.
"""

import base64
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import tensorflow as tf  # noqa: E402


def main(saved_model_dir: str) -> None:
  signature = tf.saved_model.load(saved_model_dir).signatures['serving_default']
  print(json.dumps({'ready': True, 'pid': os.getpid()}), flush=True)
  for line in sys.stdin:
    images = [base64.b64decode(item) for item in json.loads(line)]
    try:
      outputs = signature(image_bytes=tf.constant(images, tf.string))
      reply = {'probability': outputs['probability'].numpy().tolist()}
    except tf.errors.OpError as e:  # What TF Serving turns into an error status.
      reply = {'error': f'{type(e).__name__}: {e.message.strip().splitlines()[0]}'}
    print(json.dumps(reply), flush=True)


if __name__ == '__main__':
  assert 'covidlib' not in sys.modules
  main(sys.argv[1])
