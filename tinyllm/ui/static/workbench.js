// tinyllm workbench: the one piece of script besides htmx. Streams a run's answer into the page:
// each <article class="run" data-stream=URL> opens an EventSource on URL once it is on the page.
// Text goes in with textContent (never parsed as HTML), so a reply holding <script> shows as text.
(function () {
  "use strict";
  function fmt(v, unit) {
    if (v === null || v === undefined) return "-";
    if (unit === "s") return v.toFixed(3) + " s";
    if (unit === "usd") return "$" + (v < 0.01 ? v.toFixed(6) : v.toFixed(4));
    return String(v);
  }
  function stat(dl, name, value) {
    var dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name; dd.textContent = value;
    dd.className = "stat-" + name.replace(/\W+/g, "-");
    dl.appendChild(dt); dl.appendChild(dd);
  }
  function start(el) {
    if (el.dataset.started) return;
    el.dataset.started = "1";
    var answer = el.querySelector(".answer"), status = el.querySelector(".status"), stats = el.querySelector(".stats");
    var source = new EventSource(el.dataset.stream);
    var finished = false;
    status.textContent = "connecting…";
    source.addEventListener("start", function () { status.textContent = "streaming…"; el.classList.add("streaming"); });
    source.addEventListener("delta", function (e) { answer.textContent += JSON.parse(e.data); });
    source.addEventListener("done", function (e) {
      var d = JSON.parse(e.data);
      finished = true; source.close();
      el.classList.remove("streaming"); el.classList.add("done");
      status.textContent = "done";
      stat(stats, "model", d.model || "-");
      stat(stats, "latency", fmt(d.latency, "s"));
      stat(stats, "first token", fmt(d.ttft, "s"));
      stat(stats, "tokens", (d.prompt_tokens === null ? "-" : d.prompt_tokens) + " + " + (d.completion_tokens === null ? "-" : d.completion_tokens));
      stat(stats, "cost", fmt(d.cost, "usd"));
    });
    source.addEventListener("error", function (e) {
      if (finished) return;
      finished = true; source.close();
      el.classList.remove("streaming"); el.classList.add("failed");
      var message = "the stream was cut off";
      if (e.data) { var d = JSON.parse(e.data); message = d.type + ": " + d.message; }
      status.textContent = "error";
      var p = document.createElement("p"); p.className = "error"; p.textContent = message;
      el.appendChild(p);
    });
  }
  function scan(root) {
    (root.querySelectorAll ? root : document).querySelectorAll("article.run[data-stream]").forEach(start);
  }
  document.addEventListener("DOMContentLoaded", function () {
    scan(document);
    if (window.htmx) window.htmx.onLoad(scan);
  });
})();
