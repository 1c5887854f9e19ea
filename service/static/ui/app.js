// genclip-inspect review page: a little vanilla JavaScript, no dependencies, no build step.
// The pages are rendered on the server; this adds live updates, uploads and reviews.
"use strict";

(function () {
  const page = document.body.dataset.page;

  // ------------------------------------------------------------------ helpers
  function localTimes(root) {
    for (const el of (root || document).querySelectorAll("time[datetime]")) {
      const when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) {
        el.textContent = when.toLocaleString();
        el.title = el.getAttribute("datetime");
      }
    }
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return body.message || body.error || response.statusText;
    } catch (e) {
      return response.status + " " + response.statusText;
    }
  }

  function show(el, text, isError) {
    el.textContent = text;
    el.classList.toggle("error", !!isError);
  }

  function fmt(x) { return (typeof x === "number") ? x.toFixed(3) : "-"; }

  localTimes();

  // ------------------------------------------------------------------ live list
  function initLive() {
    const cards = document.getElementById("cards");
    const more = document.getElementById("more");
    const dot = document.getElementById("live-dot");
    const query = cards.dataset.query;
    const pollMs = parseInt(cards.dataset.pollMs, 10) || 2000;
    let polling = false;

    function parse(html) {
      const tpl = document.createElement("template");
      tpl.innerHTML = html;
      return Array.from(tpl.content.querySelectorAll("a.card"));
    }

    async function poll() {
      if (polling || document.hidden) return;
      polling = true;
      try {
        const response = await fetch("/ui/partials/inspections" + (query ? "?" + query : ""), {cache: "no-store"});
        if (!response.ok) throw new Error(response.status);
        const fresh = parse(await response.text());
        const first = cards.querySelector("a.card");
        for (const card of fresh) {
          const existing = cards.querySelector('a.card[data-id="' + card.dataset.id + '"]');
          if (!existing) {
            card.classList.add("fresh");
            cards.insertBefore(card, first);
          } else if (existing.dataset.version !== card.dataset.version) {
            existing.replaceWith(card);
          }
        }
        localTimes(cards);
        const empty = document.getElementById("empty");
        if (empty && fresh.length) empty.remove();
        dot.classList.remove("stale");
      } catch (e) {
        dot.classList.add("stale");
      } finally {
        polling = false;
      }
    }

    setInterval(poll, pollMs);
    document.addEventListener("visibilitychange", poll);
    window.genclipPoll = poll;

    more.addEventListener("click", async () => {
      more.disabled = true;
      const params = new URLSearchParams(query);
      params.set("cursor", more.dataset.cursor);
      const response = await fetch("/ui/partials/inspections?" + params.toString());
      more.disabled = false;
      if (!response.ok) return;
      for (const card of parse(await response.text())) {
        if (!cards.querySelector('a.card[data-id="' + card.dataset.id + '"]')) cards.appendChild(card);
      }
      localTimes(cards);
      const next = response.headers.get("X-Next-Cursor");
      more.dataset.cursor = next || "";
      more.hidden = !next;
    });

    const form = document.getElementById("inspect-form");
    const result = document.getElementById("inspect-result");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const data = new FormData(form);
      for (const key of ["product", "class_name", "part_id", "station"]) {
        if (data.has(key) && !String(data.get(key)).trim()) data.delete(key);
      }
      const button = form.querySelector("button");
      button.disabled = true;
      show(result, "inspecting...");
      try {
        const response = await fetch("/inspect?heatmap=none", {method: "POST", body: data});
        if (!response.ok) {
          show(result, "refused: " + await errorText(response), true);
          return;
        }
        const answer = await response.json();
        result.innerHTML = "";
        const verdict = document.createElement("span");
        verdict.className = "badge " + (answer.is_anomalous ? "anomalous" : "good");
        verdict.textContent = answer.is_anomalous ? "anomalous" : "good";
        const link = document.createElement("a");
        link.href = "/ui/inspections/" + encodeURIComponent(answer.id);
        link.textContent = "open";
        result.append(verdict, " score " + fmt(answer.score) + " / threshold " + fmt(answer.threshold) + " · ", link);
        result.dataset.id = answer.id;
        setTimeout(poll, 300);
        setTimeout(poll, 1000);
      } catch (e) {
        show(result, "failed: " + e, true);
      } finally {
        button.disabled = false;
      }
    });
  }

  // ------------------------------------------------------------------ one inspection
  function initDetail() {
    const slider = document.getElementById("opacity");
    const heat = document.getElementById("heat");
    const output = document.getElementById("opacity-value");
    if (slider && heat) {
      slider.addEventListener("input", () => {
        heat.style.opacity = slider.value / 100;
        output.textContent = slider.value + " %";
      });
    }
    const boxes = document.getElementById("boxes");
    const toggle = document.getElementById("show-boxes");
    if (boxes && toggle) toggle.addEventListener("change", () => boxes.classList.toggle("hidden", !toggle.checked));

    const form = document.getElementById("review-form");
    const result = document.getElementById("review-result");
    const reviewer = form.elements.reviewer;
    reviewer.value = localStorage.getItem("genclip.reviewer") || "";
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const verdict = event.submitter ? event.submitter.value : "defect";
      const body = {verdict: verdict};
      if (form.elements.note.value.trim()) body.note = form.elements.note.value.trim();
      if (reviewer.value.trim()) {
        body.reviewer = reviewer.value.trim();
        localStorage.setItem("genclip.reviewer", body.reviewer);
      }
      for (const b of form.querySelectorAll("button")) b.disabled = true;
      const response = await fetch("/inspections/" + encodeURIComponent(form.dataset.id) + "/review", {
        method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      });
      if (response.ok) {
        show(result, "saved: " + verdict);
        window.location.reload();
      } else {
        show(result, "not saved: " + await errorText(response), true);
        for (const b of form.querySelectorAll("button")) b.disabled = false;
      }
    });
  }

  // ------------------------------------------------------------------ products
  function initProducts() {
    const form = document.getElementById("product-form");
    const result = document.getElementById("product-result");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = form.elements.name.value.trim();
      const body = {few_shot: form.elements.few_shot.checked};
      if (form.elements.class_name.value.trim()) body.class_name = form.elements.class_name.value.trim();
      if (form.elements.false_reject_rate.value) body.false_reject_rate = parseFloat(form.elements.false_reject_rate.value);
      const response = await fetch("/products/" + encodeURIComponent(name), {
        method: "PUT", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      });
      if (response.ok) {
        show(result, "saved " + name);
        setTimeout(() => window.location.reload(), 300);
      } else {
        show(result, "not saved: " + await errorText(response), true);
      }
    });

    const good = document.getElementById("good-form");
    const goodResult = document.getElementById("good-result");
    good.addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = good.elements.product.value;
      const data = new FormData();
      for (const file of good.elements.images.files) data.append("images", file);
      const button = good.querySelector("button");
      button.disabled = true;
      show(goodResult, "uploading " + good.elements.images.files.length + " photo(s) and calibrating...");
      try {
        const response = await fetch("/products/" + encodeURIComponent(name) + "/good", {method: "POST", body: data});
        if (!response.ok) {
          show(goodResult, "refused: " + await errorText(response), true);
          return;
        }
        const result = await response.json();
        const product = result.product || {};
        show(goodResult, name + ": " + result.added + " photo(s) added, " + result.duplicates + " already there; " +
             (result.calibrated ? "calibration " + product.calibration_status + ", threshold " + fmt(product.image_threshold)
                                : "calibrating in the background"));
        setTimeout(() => window.location.reload(), 1500);
      } finally {
        button.disabled = false;
      }
    });
  }

  // ------------------------------------------------------------------ API key (only with keys set)
  function initLogin() {
    const form = document.getElementById("login-form");
    if (!form) return;
    const result = document.getElementById("login-result");
    function setCookie(value, maxAge) {
      document.cookie = "genclip_api_key=" + encodeURIComponent(value) + "; path=/; SameSite=Strict; max-age=" + maxAge +
        (location.protocol === "https:" ? "; Secure" : "");
    }
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      setCookie(form.elements.key.value, 30 * 24 * 3600);
      const response = await fetch("/inspections?limit=1", {cache: "no-store"});
      if (response.ok) {
        window.location.href = form.dataset.next || "/ui";
      } else {
        setCookie("", 0);
        show(result, "that key is not accepted", true);
      }
    });
    document.getElementById("forget-key").addEventListener("click", () => {
      setCookie("", 0);
      show(result, "forgotten");
    });
  }

  const init = {live: initLive, detail: initDetail, products: initProducts, login: initLogin}[page];
  if (init) init();
})();
