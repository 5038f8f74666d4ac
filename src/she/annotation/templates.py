"""The pages of the annotation app: Jinja2 templates with autoescaping on (every product text is untrusted
input), inline CSS and one inline script carrying the request's CSP nonce. No external assets."""

from __future__ import annotations

from jinja2 import DictLoader, Environment, select_autoescape

CSS = """
*{box-sizing:border-box} body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#f6f6f4}
header{display:flex;gap:1.5em;align-items:center;padding:.5em 1em;background:#263238;color:#fff;flex-wrap:wrap}
header a{color:#cfe8ff} main{display:grid;grid-template-columns:minmax(260px,1fr) 2fr;gap:1em;padding:1em}
@media (max-width:900px){main{grid-template-columns:1fr}}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em}
h2{font-size:1em;margin:.2em 0 .6em;text-transform:uppercase;letter-spacing:.05em;color:#555}
.query{font-size:1.3em;font-weight:600} .title{font-weight:600} .muted{color:#666;font-size:.9em}
table{border-collapse:collapse} td{padding:1px 8px 1px 0;vertical-align:top}
.row{border:2px solid transparent;border-radius:5px;padding:.35em .5em;margin:.15em 0}
.row.sel{border-color:#1e88e5;background:#eef6ff} .step{background:#fafafa}
.fact{margin-left:1.6em;font-size:.93em} .key{font-weight:700;display:inline-block;min-width:6.5em}
.steptext{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
button{font:inherit;font-size:.85em;margin:0 .15em;padding:.1em .5em;border:1px solid #999;border-radius:4px;
background:#fff;cursor:pointer} button.on{background:#1e88e5;color:#fff;border-color:#1e88e5}
kbd{font:12px ui-monospace,monospace;border:1px solid #aaa;border-bottom-width:2px;border-radius:3px;padding:0 3px;
background:#fff;color:#222} .status{margin-left:.5em;font-size:.88em} .right{color:#2e7d32} .wrong{color:#c62828}
.corr{color:#ad6800} .pill{display:inline-block;padding:0 .5em;border-radius:9px;background:#e0e0e0;font-size:.85em}
footer{padding:.5em 1em;color:#444;font-size:.9em} #msg{font-weight:600}
"""

BASE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{% block title %}she annotate{% endblock %}</title>
<style nonce="{{ nonce }}">{{ css|safe }}</style></head><body>
<header><strong>she annotate</strong>{% block header %}{% endblock %}</header>
{% block body %}{% endblock %}</body></html>"""

LOGIN = """{% extends "base" %}{% block body %}<main><section><h2>Sign in</h2>
{% if error %}<p class="wrong">{{ error }}</p>{% endif %}
<form method="post" action="/login"><label>Annotator token <input type="password" name="token" id="token"
autofocus size="40"></label> <button type="submit">Sign in</button></form></section></main>{% endblock %}"""

PROGRESS = """<span>{{ progress.complete }} / {{ progress["items"] }} items complete</span>
<span>you ({{ who }}): <span id="mine">{{ mine.done }} done, {{ mine.answers }} answers</span></span>
<span>{% for a, c in progress.annotators.items() %}{{ a }} {{ c.done }}{% if not loop.last %} · {% endif %}{% endfor %}</span>
<a href="/stats">stats</a>"""

EMPTY = """{% extends "base" %}{% block header %}""" + PROGRESS + """{% endblock %}
{% block body %}<main><section><h2>Queue</h2><p>Nothing left for you in the queue. Thank you!</p></section></main>
{% endblock %}"""

ITEM = """{% extends "base" %}{% block header %}""" + PROGRESS + """{% endblock %}
{% block body %}<main>
<section id="pair"><h2>Pair <span class="pill">{{ item.reason or "queue" }}</span>
{% if item.payload.priority is defined %}<span class="muted">priority {{ item.payload.priority }}</span>{% endif %}</h2>
<div class="muted">record {{ item.record_id }}</div>
<p class="query" id="query">{{ rec.query }}</p>
<p class="title" id="title">{{ rec.product.title }}</p>
<table>{% for k in ("brand", "color", "description") %}{% if rec.product[k] %}
<tr><td class="muted">{{ k }}</td><td>{{ rec.product[k] }}</td></tr>{% endif %}{% endfor %}
{% for k, v in (rec.product.attributes or {}).items() %}<tr><td class="muted">{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</table>
<p>Policy label: <strong>{{ item.payload.label or "(none)" }}</strong> · Gold label:
<strong id="gold">{{ item.payload.gold or "unknown" }}</strong></p></section>
<section id="steps"><h2>The policy's steps</h2>
{% for s in item.payload.steps %}{% set k = loop.index0 %}
<div class="row step" data-kind="step" data-target="step:{{ k }}" data-step="{{ k }}">
<span class="key">{{ s.key }}</span><span class="steptext">{{ s.text }}</span><br>
<span class="muted">judge {{ "%.2f"|format(s.judge) if s.judge is not none else "–" }} · verifier
{{ {1.0: "right", 0.0: "wrong"}.get(s.verifier, "cannot decide") }}</span>
<button data-act="right">right <kbd>r</kbd></button><button data-act="wrong">wrong <kbd>w</kbd></button>
<span class="status"></span></div>
{% for f in s.fields %}<div class="row fact" data-kind="fact" data-target="fact:{{ f }}" data-field="{{ f }}">
<span class="key">{{ f }}</span>{% for v in vocab[f] %}<button data-value="{{ v }}">{{ v }} <kbd>{{ loop.index }}</kbd></button>{% endfor %}
<button data-value="">clear <kbd>0</kbd></button><span class="status"></span></div>{% endfor %}
{% endfor %}
<p><button id="finish">finish, next <kbd>n</kbd></button> <button id="skip">skip <kbd>s</kbd></button>
<span id="msg" role="status"></span></p></section></main>
<footer><kbd>j</kbd>/<kbd>↓</kbd> next row · <kbd>k</kbd>/<kbd>↑</kbd> previous row · <kbd>r</kbd> step right ·
<kbd>w</kbd> step wrong · <kbd>1</kbd>–<kbd>9</kbd> fact value · <kbd>0</kbd> clear fact · <kbd>n</kbd> finish and
next · <kbd>s</kbd> skip · <kbd>g</kbd> stats</footer>
<script type="application/json" id="state">{{ state|tojson }}</script>
<script nonce="{{ nonce }}">""" + """
(function(){
const ITEM = {{ item.item_id|tojson }};
let state = JSON.parse(document.getElementById('state').textContent);
const rows = Array.from(document.querySelectorAll('.row'));
let sel = 0;
const msg = document.getElementById('msg');
function show(){
  rows.forEach((r, i) => r.classList.toggle('sel', i === sel));
  rows.forEach(r => {
    const st = state[r.dataset.target]; const out = r.querySelector('.status'); out.textContent = '';
    r.querySelectorAll('button').forEach(b => b.classList.toggle('on', !!st &&
      (b.dataset.act === st.value || (b.dataset.value !== undefined && b.dataset.value === st.value))));
    if (!st) return;
    const v = document.createElement('span'); v.className = st.value === 'wrong' ? 'wrong' : 'right';
    v.textContent = st.value + (st.by ? ' (' + st.by + ')' : ''); out.appendChild(v);
    if (st.previous !== null && st.previous !== undefined && st.previous !== st.value) {
      const c = document.createElement('span'); c.className = 'corr';
      c.textContent = ' corrected, was ' + st.previous + (st.previous_src ? ' [' + st.previous_src + ']' : '');
      out.appendChild(c);
    }
  });
  if (rows[sel]) rows[sel].scrollIntoView({block: 'nearest'});
}
async function post(url, body){
  const r = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'},
                             body: JSON.stringify(body), credentials: 'same-origin'});
  const j = await r.json().catch(() => ({}));
  if (!r.ok) { msg.textContent = 'not saved: ' + (j.detail || r.status); msg.className = 'wrong'; return null; }
  return j;
}
async function answer(body){
  msg.textContent = 'saving…'; msg.className = '';
  const j = await post('/api/answer', Object.assign({item_id: ITEM}, body));
  if (j) {
    state = j.state; msg.textContent = 'saved (' + j.stored + ')'; msg.className = 'right'; show();
    document.getElementById('mine').textContent = j.mine.done + ' done, ' + j.mine.answers + ' answers';
  }
}
function mark(v){ const r = rows[sel]; if (r && r.dataset.kind === 'step') answer({steps: {[r.dataset.step]: v}}); }
function fact(i){
  const r = rows[sel]; if (!r || r.dataset.kind !== 'fact') return;
  const bs = Array.from(r.querySelectorAll('button[data-value]')).filter(b => b.dataset.value !== '');
  if (i === 0) answer({facts: {[r.dataset.field]: null}});
  else if (bs[i - 1]) answer({facts: {[r.dataset.field]: bs[i - 1].dataset.value}});
}
async function finish(){ const j = await post('/api/finish', {item_id: ITEM}); if (j) location.href = j.next; }
async function skip(){ const j = await post('/api/skip', {item_id: ITEM}); if (j) location.href = j.next; }
rows.forEach((r, i) => r.addEventListener('click', ev => {
  sel = i; const b = ev.target.closest('button'); show(); if (!b) return;
  if (b.dataset.act) mark(b.dataset.act);
  else if (b.dataset.value !== undefined) answer({facts: {[r.dataset.field]: b.dataset.value || null}});
}));
document.getElementById('finish').addEventListener('click', finish);
document.getElementById('skip').addEventListener('click', skip);
document.addEventListener('keydown', ev => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.target.tagName === 'INPUT') return;
  const k = ev.key;
  if (k === 'j' || k === 'ArrowDown') sel = Math.min(sel + 1, rows.length - 1);
  else if (k === 'k' || k === 'ArrowUp') sel = Math.max(sel - 1, 0);
  else if (k === 'r') return mark('right');
  else if (k === 'w') return mark('wrong');
  else if (k >= '0' && k <= '9') return fact(Number(k));
  else if (k === 'n') return finish();
  else if (k === 's') return skip();
  else if (k === 'g') { location.href = '/stats'; return; }
  else return;
  ev.preventDefault(); show();
});
show();
})();
</script>{% endblock %}"""

STATS = """{% extends "base" %}{% block header %}""" + PROGRESS + """{% endblock %}
{% block body %}<main><section><h2>Progress</h2>
<p>{{ progress.complete }} of {{ progress["items"] }} items complete.</p>
<table><tr><th>annotator</th><th>items done</th><th>answers</th></tr>
{% for a, c in progress.annotators.items() %}<tr><td>{{ a }}</td><td>{{ c.done }}</td><td>{{ c.answers }}</td></tr>{% endfor %}
</table></section>
<section><h2>Agreement (Cohen's kappa on doubly annotated questions)</h2>
{% for kind, ag in agreement.items() %}<p><strong>{{ kind }}</strong>: {{ ag.units }} doubly annotated;
kappa {{ "%.3f"|format(ag.overall) if ag.overall is not none else "–" }}</p>
<table>{% for pair, v in ag.pairs.items() %}<tr><td>{{ pair }}</td><td>n={{ v.n }}</td>
<td>kappa {{ "%.3f"|format(v.kappa) if v.kappa is not none else "–" }}</td></tr>{% endfor %}</table>{% endfor %}
<p><a href="/">back to the queue</a></p></section></main>{% endblock %}"""

ENV = Environment(loader=DictLoader({"base": BASE, "login": LOGIN, "empty": EMPTY, "item": ITEM, "stats": STATS}),
                  autoescape=select_autoescape(default=True, default_for_string=True))


def render(name: str, **ctx) -> str:
    return ENV.get_template(name).render(css=CSS, **ctx)
