#!/usr/bin/env python3
"""A Stripe API fake for autopay's integration tests: localstripe plus a layer that plays
Stripe's idempotency keys and injects network faults, in one process on 127.0.0.1 only.

    python3 tests/stripe/peer.py [--port N] [--port-file PATH] [--list-filters] [--verbose]

Once listening it writes the port to --port-file (atomically) and prints
`listening on 127.0.0.1:PORT` on stdout. SIGTERM or SIGINT stops it. Its store lives in memory
only (never /tmp/localstripe.pickle), so any number of peers can run side by side.

Control endpoints (no auth): POST /_proxy/faults (JSON, replaces the fault settings),
GET /_proxy/faults, GET /_proxy/stats, DELETE /_proxy/stats, and localstripe's own
DELETE /_config/data (which here also clears idempotency keys, faults and counters) and
POST /_config/webhooks/{id}. See tests/stripe/README.md.
"""

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import os
import random
import secrets
import signal
import string
import sys
import time

# Stop cleanly even when told to while still importing (the event loop takes over later).
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

try:
    from aiohttp import web
    from localstripe.errors import UserError
    from localstripe.resources import Store, store
    from localstripe import server
    from localstripe.server import app, unflatten_data
except ImportError as error:  # the harness turns this into the fix
    print(f"localstripe is not installed ({error}): run "
          f"`{sys.executable} -m pip install 'localstripe>=1.15,<1.16'`", file=sys.stderr)
    sys.exit(3)

# --- localstripe patches --------------------------------------------------------------------

# localstripe pickles its whole store to the fixed file /tmp/localstripe.pickle on every write
# (Store.__setitem__/__delitem__ and a middleware) and its CLI loads it back at start. Peers run
# in parallel, so each keeps its store in memory only and starts empty.
Store.dump_to_disk = lambda self: None
Store.try_load_from_disk = lambda self: None
store.clear()


# localstripe's get_api_key crashes (a 500 with a traceback) on an Authorization scheme other
# than Basic or Bearer; Stripe answers 401, as localstripe does for a missing key.
_get_api_key = server.get_api_key


def get_api_key(request):
    try:
        return _get_api_key(request)
    except Exception:
        return None


server.get_api_key = get_api_key


# localstripe's own answers are kept as they are otherwise: a decline is a 402
# `invalid_request_error` with code `card_declined` and no decline_code, and a PaymentIntent's
# `latest_charge` comes expanded. autopay's adapter reads both shapes (docs/processor.md).

# --- the proxy's state ----------------------------------------------------------------------

MODES = ('drop_request', 'drop_answer', 'status_500', 'status_429', 'status_401', 'delay')
ERROR_500 = {'error': {'type': 'api_error', 'message': 'An unknown error occurred'}}
ERROR_429 = {'error': {'type': 'invalid_request_error', 'code': 'rate_limit',
                       'message': 'Too many requests'}}
ERROR_401 = {'error': {'type': 'invalid_request_error',
                       'message': 'Invalid API Key provided: sk_test_****'}}
ERROR_IN_USE = {'error': {
    'type': 'idempotency_error', 'code': 'idempotency_key_in_use',
    'message': 'There is currently another in-progress request using this '
               'Stripe-Idempotency-Key. Please try again later.'}}
MISMATCH = ("Keys for idempotent requests can only be used with the same parameters they were "
            "first used with. Try using a key other than '{}' if you meant to execute a "
            "different request.")


def parse_faults(d):
    """Checks and normalizes a POST /_proxy/faults body; ValueError says what is wrong."""
    if not isinstance(d, dict):
        raise ValueError('the body must be a JSON object')
    f = {'drop_request_rate': float(d.get('drop_request_rate') or 0),
         'drop_answer_rate': float(d.get('drop_answer_rate') or 0),
         'seed': d.get('seed', 0),
         'path_prefix': str(d.get('path_prefix') or '/v1'),
         'methods': [str(m).upper() for m in d.get('methods') or []],  # empty: every method
         'rules': []}
    for r in d.get('rules') or []:
        if not isinstance(r, dict) or r.get('mode') not in MODES:
            raise ValueError(f'each rule needs a mode among {MODES}: {r!r}')
        rule = {'mode': r['mode'], 'count': int(r.get('count', 1)),
                'path_prefix': str(r.get('path_prefix') or '/v1'),
                'method': r['method'].upper() if r.get('method') else None,  # None: any
                'delay_ms': int(r.get('delay_ms', 0)),
                'retry_after': int(r.get('retry_after', 1))}
        if rule['count'] < 1:
            raise ValueError(f'count must be at least 1: {r!r}')
        f['rules'].append(rule)
    return f


class Proxy:
    def __init__(self):
        self.reset()

    def reset(self):
        self.disputes = {}  # id -> dispute filed through POST /_proxy/disputes
        self.keys = {}  # (api key, Idempotency-Key) -> entry; entry['status'] None: in progress
        self.faults = parse_faults({})
        self.rng = random.Random(0)
        self.arrivals = collections.deque()  # monotonic times of the last second's requests
        self.reset_stats()

    def reset_stats(self):
        self.stats = {'requests': 0, 'forwarded': 0, 'dropped_requests': 0,
                      'dropped_answers': 0, 'replayed': 0, 'status_500': 0, 'status_429': 0,
                      'key_in_use': 0, 'key_mismatch': 0, 'max_in_one_second': 0,
                      'by_route': {}}
        self.arrivals.clear()

    def set_faults(self, f):
        self.faults = f
        self.rng = random.Random(f['seed'])

    def count(self, method, path):
        s = self.stats
        s['requests'] += 1
        route = f'{method} {path}'
        s['by_route'][route] = s['by_route'].get(route, 0) + 1
        now = time.monotonic()
        self.arrivals.append(now)
        while now - self.arrivals[0] >= 1.0:
            self.arrivals.popleft()
        s['max_in_one_second'] = max(s['max_in_one_second'], len(self.arrivals))

    def pick_fault(self, method, path):
        """The fault for this request, if any: the first matching rule, else the rates."""
        for rule in self.faults['rules']:
            if path.startswith(rule['path_prefix']) and rule['method'] in (None, method):
                rule['count'] -= 1
                if rule['count'] == 0:
                    self.faults['rules'].remove(rule)
                return rule
        f = self.faults
        if path.startswith(f['path_prefix']) and (not f['methods'] or method in f['methods']):
            if f['drop_request_rate'] and self.rng.random() < f['drop_request_rate']:
                return {'mode': 'drop_request'}
            if f['drop_answer_rate'] and self.rng.random() < f['drop_answer_rate']:
                return {'mode': 'drop_answer'}
        return None


proxy = Proxy()

# --- the layer in front of localstripe ------------------------------------------------------


def json_answer(body, status=200, headers=None):
    return web.Response(status=status, text=json.dumps(body, indent=2) + '\n',
                        content_type='application/json', headers=headers)


def request_id():
    return 'req_' + ''.join(secrets.choice(string.ascii_letters + string.digits)
                            for _ in range(14))


def drop(request):
    """Closes the connection at once; aiohttp then fails to write the answer and sends nothing."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)  # never sent: the transport is closing


async def call(handler, request):
    """Runs localstripe; aiohttp's own errors (unknown route, 405) become plain answers."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return web.Response(status=exc.status, text=exc.text, content_type='text/plain')


def api_scope(request):
    """Idempotency keys belong to one API key, however it is sent (Basic or Bearer)."""
    return get_api_key(request) or request.headers.get('Authorization', '')


async def control(request):
    """The /_proxy/ endpoints."""
    route = (request.method, request.path)
    if route == ('POST', '/_proxy/faults'):
        try:
            proxy.set_faults(parse_faults(json.loads(await request.read() or b'{}')))
        except (ValueError, TypeError) as e:
            return json_answer({'error': {'type': 'invalid_request_error',
                                          'message': str(e)}}, 400)
        return json_answer(proxy.faults)
    if route == ('POST', '/_proxy/disputes'):
        # localstripe has no disputes: a test files one here, and GET /v1/disputes/{id}
        # answers it as Stripe would (only the fields a client reads).
        d = json.loads(await request.read() or b'{}')
        dispute = {'id': 'dp_' + request_id()[4:], 'object': 'dispute',
                   'charge': d.get('charge'), 'payment_intent': d.get('payment_intent'),
                   'reason': d.get('reason', 'general'), 'status': 'needs_response',
                   'amount': d.get('amount', 0), 'livemode': False}
        proxy.disputes[dispute['id']] = dispute
        return json_answer(dispute)
    if route == ('GET', '/_proxy/faults'):
        return json_answer(proxy.faults)
    if route == ('GET', '/_proxy/stats'):
        return json_answer(proxy.stats)
    if route == ('DELETE', '/_proxy/stats'):
        proxy.reset_stats()
        return json_answer(proxy.stats)
    return json_answer({'error': {'type': 'invalid_request_error',
                                  'message': f'no control endpoint {route}'}}, 404)


@web.middleware
async def stripe_layer(request, handler):
    """Outermost middleware: control endpoints, stats, faults and idempotency keys."""
    path, method = request.path, request.method
    if path.startswith('/_proxy/'):
        return await control(request)
    rid = request_id()
    if not path.startswith('/v1/'):
        resp = await call(handler, request)
        if (method, path) == ('DELETE', '/_config/data') and resp.status == 200:
            proxy.reset()  # localstripe cleared its store: clear ours too
        resp.headers['Request-Id'] = rid
        return resp

    proxy.count(method, path)
    if method == 'GET' and path.startswith('/v1/disputes/'):
        if get_api_key(request) is None:
            return json_answer({'error': {'type': 'invalid_request_error',
                                          'message': 'Invalid API Key provided'}}, 401)
        dispute = proxy.disputes.get(path.rsplit('/', 1)[-1])
        if dispute is None:
            return json_answer({'error': {'type': 'invalid_request_error',
                                          'code': 'resource_missing',
                                          'message': 'No such dispute'}}, 404)
        return json_answer(dispute, headers={'Request-Id': rid})
    fault = proxy.pick_fault(method, path) or {'mode': None}
    mode = fault['mode']
    if mode == 'drop_request':
        proxy.stats['dropped_requests'] += 1
        return drop(request)
    key = request.headers.get('Idempotency-Key')
    headers = {'Request-Id': rid, **({'Idempotency-Key': key} if key else {})}
    if mode == 'status_401':  # the key is checked before everything: nothing stored
        proxy.stats['status_401'] = proxy.stats.get('status_401', 0) + 1
        return json_answer(ERROR_401, 401, headers)
    if mode == 'status_429':  # the rate limiter stands before everything: nothing stored
        proxy.stats['status_429'] += 1
        return json_answer(ERROR_429, 429, {**headers, 'Retry-After': str(fault['retry_after']),
                                            'Stripe-Should-Retry': 'true'})

    entry = scope = None
    if key and method == 'POST':
        scope = (api_scope(request), key)
        fingerprint = (method, path, hashlib.sha256(await request.read()).hexdigest())
        entry = proxy.keys.get(scope)
        if entry is not None and entry['fingerprint'] != fingerprint:
            proxy.stats['key_mismatch'] += 1
            return json_answer({'error': {'type': 'idempotency_error',
                                          'message': MISMATCH.format(key)}}, 400, headers)
        if entry is not None and entry['status'] is None:
            proxy.stats['key_in_use'] += 1
            return json_answer(ERROR_IN_USE, 409, headers)
        if entry is not None:  # a replay: the stored answer, whatever it was
            if mode == 'delay':
                await asyncio.sleep(fault['delay_ms'] / 1000)
            proxy.stats['replayed'] += 1
            if mode == 'drop_answer':
                proxy.stats['dropped_answers'] += 1
                return drop(request)
            return web.Response(status=entry['status'], body=entry['body'], headers={
                **headers, 'Content-Type': entry['content_type'],
                'Idempotent-Replayed': 'true', 'Original-Request': entry['request_id']})
        entry = proxy.keys[scope] = {'fingerprint': fingerprint, 'status': None,
                                     'request_id': rid}

    try:
        if mode == 'status_500':  # Stripe failed inside: stored, replayed on a resend
            proxy.stats['status_500'] += 1
            resp = json_answer(ERROR_500, 500)
        else:
            if mode == 'delay':
                await asyncio.sleep(fault['delay_ms'] / 1000)
            proxy.stats['forwarded'] += 1
            resp = await call(handler, request)
    except BaseException:
        if entry is not None and proxy.keys.get(scope) is entry:
            del proxy.keys[scope]  # nothing to replay: the next try runs afresh
        raise
    if entry is not None and proxy.keys.get(scope) is entry:  # (a reset may have cleared it)
        if resp.status == 429 or not isinstance(resp, web.Response):
            del proxy.keys[scope]
        else:
            entry.update(status=resp.status, body=resp.body or b'',
                         content_type=resp.headers.get('Content-Type', 'application/json'))
    if mode == 'drop_answer':
        proxy.stats['dropped_answers'] += 1
        return drop(request)
    resp.headers.update(headers)
    return resp

# --- GET /v1/payment_intents like Stripe (--list-filters) -----------------------------------


def list_payment_intents(request):
    """Filters by customer and created, newest first, pages with limit, starting_after and
    ending_before. Reads localstripe's store directly (same process), in insertion order."""
    q = unflatten_data(request.query)
    expand = q.pop('expand', None) or []
    customer, created = q.pop('customer', None), q.pop('created', None)
    limit, after, before = q.pop('limit', '10'), q.pop('starting_after', None), \
        q.pop('ending_before', None)
    if q:
        raise UserError(400, 'Received unknown parameter: ' + ', '.join(sorted(q)))
    try:
        limit = int(limit)
        assert 1 <= limit <= 100
    except (ValueError, TypeError, AssertionError):
        raise UserError(400, f'Invalid limit: must be between 1 and 100 (got {limit!r})',
                        {'param': 'limit'})
    if not isinstance(expand, list) or any(not str(p).startswith('data.') for p in expand):
        raise UserError(400, 'expand must be a list of data.* paths', {'param': 'expand'})
    if isinstance(created, str):
        created = {'eq': created}
    tests = {'eq': int.__eq__, 'gt': int.__gt__, 'gte': int.__ge__,
             'lt': int.__lt__, 'lte': int.__le__}
    try:
        bounds = [(tests[op], int(v)) for op, v in (created or {}).items()]
    except (KeyError, ValueError, TypeError, AttributeError):
        raise UserError(400, f'Invalid created: {created!r}', {'param': 'created'})

    # Newest first: by created, then by insertion order (ids are random, not time-ordered).
    everything = [v for k, v in store.items() if k.startswith('payment_intent:')]
    ranked = [pi for _, pi in sorted(enumerate(everything), reverse=True,
                                     key=lambda p: (p[1].created, p[0]))]
    position = {pi.id: i for i, pi in enumerate(ranked)}
    for name, cursor in (('starting_after', after), ('ending_before', before)):
        if cursor is not None and cursor not in position:
            raise UserError(404, f"No such payment_intent: '{cursor}'",
                            {'code': 'resource_missing', 'param': name})
    if after is not None:
        ranked = ranked[position[after] + 1:]
    elif before is not None:
        ranked = ranked[:position[before]]
    chosen = [pi for pi in ranked
              if (customer is None or pi.customer == customer)
              and all(test(pi.created, v) for test, v in bounds)]
    page = chosen[-limit:] if (before is not None and after is None) else chosen[:limit]
    inner = [p[len('data.'):] for p in expand]
    return json_answer({'object': 'list', 'url': '/v1/payment_intents',
                        'has_more': len(chosen) > limit,
                        'data': [pi._export(expand=inner) for pi in page]})


@web.middleware
async def list_filters_layer(request, handler):
    """Innermost middleware, so localstripe's auth and error handling still apply."""
    if request.method == 'GET' and request.path == '/v1/payment_intents':
        return list_payment_intents(request)
    return await handler(request)

# --- serving --------------------------------------------------------------------------------


def write_port_file(path, port):
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(f'{port}\n')
    os.replace(tmp, path)


async def serve(args):
    app.middlewares.insert(0, stripe_layer)
    if args.list_filters:
        app.middlewares.append(list_filters_layer)
    if args.verbose:  # access log (and localstripe's webhook log) on stderr
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, shutdown_timeout=1.0,
                           **({} if args.verbose else {'access_log': None}))
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', args.port).start()  # 127.0.0.1 only, IPv4
    port = runner.addresses[0][1]
    if args.port_file:
        write_port_file(args.port_file, port)
    print(f'listening on 127.0.0.1:{port}', flush=True)
    await stop.wait()
    await runner.cleanup()  # waits at most about 2 s for requests in flight


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--port', type=int, default=0, help='0 (default): any free port')
    parser.add_argument('--port-file', help='write the port number here once listening')
    parser.add_argument('--list-filters', action='store_true',
                        help='answer GET /v1/payment_intents like Stripe (customer, created)')
    parser.add_argument('--verbose', action='store_true', help='access log on stderr')
    asyncio.run(serve(parser.parse_args()))


if __name__ == '__main__':
    main()
