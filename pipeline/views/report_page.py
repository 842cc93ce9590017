"""The report's one HTML file: styles, script and plots inline, data as JSON in the page, nothing fetched.

    text = page(title, sections, data)     # sections: HTML strings, in order; the report writes it

The heatmaps are drawn by a small script from the embedded JSON: each token a span whose background
is its score's step on the shared colour scale (pipeline.views.score_colours); hovering one shows its
numbers. The marker `<meta name="generator" content="sstoken report">` lets a rerun replace a page it
wrote, and nothing else (`pipeline.runtime.stage_runner.run_file_stage` checks it).
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from pipeline.views.score_colours import RAMP
from pipeline.views.stats import SampleView

GENERATOR = '<meta name="generator" content="sstoken report">'

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:0 18px 60px;color:#1d2433}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde3ea}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#68758a}
table{border-collapse:collapse;margin:6px 0 10px}td,th{padding:3px 10px;border-bottom:1px solid #eef1f4;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f5f7fa}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plot svg{max-width:100%;height:auto}
.sample{border:1px solid #dde3ea;border-radius:6px;padding:8px 10px;margin:10px 0}
.sample .head{font-size:12px;color:#445066;margin-bottom:4px}
.tokens{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
.t{border-radius:2px;padding:0 1px}.t.c{color:#a3acb9}
.t.k{font-weight:700;box-shadow:inset 0 -2px 0 #1d2433}.t.d{text-decoration:line-through;color:#5b6575}
#tip{position:fixed;display:none;background:#1d2433;color:#fff;font:12px/1.4 ui-monospace,monospace;padding:6px 8px;
border-radius:4px;pointer-events:none;z-index:9;white-space:pre}
.legend span{display:inline-block;width:18px;height:12px;vertical-align:middle}
details pre{background:#f5f7fa;padding:8px;overflow:auto;max-height:420px;font-size:12px}
input#search{font-size:14px;padding:4px 8px;width:260px}
"""

SCRIPT = """
(function(){
const data=JSON.parse(document.getElementById('report-data').textContent);
const tip=document.getElementById('tip');
const names=['nll_cur','nll_hist','rel','attn','score'];
const roles=['context','dropped','kept'];
function fmt(v){return v===null?'-':Number(v).toPrecision(4);}
function level(s){const lo=data.scale[0],hi=data.scale[1];if(s===null||!(hi>lo))return 0;
  const share=Math.min(1,Math.max(0,(s-lo)/(hi-lo)));return Math.min(data.palette.length-1,Math.floor(share*data.palette.length));}
function render(sample){
  const box=document.createElement('div');box.className='sample';box.dataset.sample=sample.id;
  const head=document.createElement('div');head.className='head';
  head.textContent=sample.id+' \\u00b7 '+sample.source+' \\u00b7 '+sample.why+' \\u00b7 '+sample.kept+' of '+sample.targets+
    ' targets kept \\u00b7 mean score '+fmt(sample.mean_score)+(sample.cut?' \\u00b7 first '+sample.pieces.length+' tokens shown':'');
  box.appendChild(head);
  const line=document.createElement('div');line.className='tokens';
  sample.pieces.forEach(function(piece,i){
    const row=sample.t[i];const span=document.createElement('span');
    span.className='t '+'cdk'[row[0]];span.textContent=piece;span.dataset.i=i;
    if(row[0]>0)span.style.background=data.palette[level(row[5])];
    line.appendChild(span);});
  line.addEventListener('mouseover',function(e){const i=e.target.dataset.i;if(i===undefined)return;
    const row=sample.t[+i];let text='position '+i+'  '+JSON.stringify(sample.pieces[+i])+'  '+roles[row[0]];
    if(row[0]>0)names.forEach(function(n,k){text+='\\n'+n.padEnd(9)+fmt(row[k+1]);});
    tip.textContent=text;tip.style.display='block';});
  line.addEventListener('mousemove',function(e){tip.style.left=(e.clientX+14)+'px';tip.style.top=(e.clientY+14)+'px';});
  line.addEventListener('mouseout',function(){tip.style.display='none';});
  box.appendChild(line);return box;}
const byId={};data.samples.forEach(function(s){byId[s.id]=s;});
document.querySelectorAll('[data-group]').forEach(function(group){
  data.samples.filter(function(s){return s.why===group.dataset.group;}).forEach(function(s){group.appendChild(render(s));});});
const search=document.getElementById('search');const found=document.getElementById('found');
if(search){search.addEventListener('input',function(){
  const id=search.value.trim();found.textContent='';if(!id)return;
  if(byId[id]){found.appendChild(render(byId[id]));return;}
  const at=data.index.ids.indexOf(id);const note=document.createElement('p');
  if(at<0){note.textContent='no sample '+JSON.stringify(id)+' in this round';}
  else{note.textContent=id+': '+data.index.kept[at]+' of '+data.index.targets[at]+' targets kept, mean score '+
    fmt(data.index.mean_score[at])+'; its tokens are not embedded in this page: sstoken inspect '+data.folder+' --sample '+id;}
  found.appendChild(note);});}
})();
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: Any, digits: int = 4) -> Any:
    """A float rounded to `digits` significant digits for the page's JSON; NaN and None become null."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def sample_json(view: SampleView, mean_score: float | None, max_tokens: int) -> dict[str, Any]:
    """One heatmap's data: token texts and, per token, [role, nll_cur, nll_hist, rel, attn, score]."""
    frame = view.tokens.head(max_tokens)
    columns = [frame[name].to_list() for name in ("trainable", "keep", "nll_cur", "nll_hist", "rel", "attn", "score")]
    rows = [[2 if kept else 1 if target else 0, *(number(v) for v in values)]
            for target, kept, *values in zip(*columns)]
    return {"id": view.sample_id, "source": view.source, "why": view.why, "kept": view.kept, "targets": view.targets,
            "mean_score": number(mean_score), "pieces": view.pieces[:max_tokens], "t": rows,
            "cut": view.tokens.height > max_tokens}


def data_script(data: dict[str, Any]) -> str:
    """The page's data as a JSON script element ("</" escaped, so no token text can end the element)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="report-data">{text}</script>'


def legend(scale: list[float]) -> str:
    steps = "".join(f'<span style="background:{colour}"></span>' for colour in RAMP)
    return (f'<p class="legend muted">score {scale[0]:.3g} {steps} {scale[1]:.3g} (2nd to 98th percentile of the '
            'targets) · <b>kept</b> bold, underlined · <s>dropped</s> struck through · context grey · hover a token '
            'for its numbers</p>')


def page(title: str, sections: list[str], data: dict[str, Any] | None = None) -> str:
    script = f"{data_script(data)}<script>{SCRIPT}</script>" if data is not None else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{GENERATOR}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><div id=\"tip\"></div>{''.join(sections)}{script}</body></html>")
