// mailproxy admin: live account rows and the device-code countdown. Every action works
// without this file; it only saves reloading.
"use strict";
(function () {
  function fetchOk(url) {
    return fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r;
    });
  }

  var rows = document.querySelector("[data-live]");
  if (rows) {
    var stamp = document.querySelector("[data-updated]");
    setInterval(function () {
      fetchOk(rows.getAttribute("data-live")).then(function (r) { return r.text(); })
        .then(function (html) {
          rows.innerHTML = html;  // rendered and escaped by the server's templates
          if (stamp) { stamp.textContent = "Updated " + new Date().toLocaleTimeString() + "."; }
        })
        .catch(function () {
          if (stamp) { stamp.textContent = "Live update stopped (signed out or daemon gone); reload the page."; }
        });
    }, 5000);
  }

  var device = document.querySelector("[data-device]");
  if (device) {
    var state = device.querySelector("[data-state]");
    var counter = device.querySelector("[data-countdown]");
    var left = counter ? parseInt(counter.getAttribute("data-countdown"), 10) : null;
    var done = device.className.indexOf("state-approved") >= 0 || device.className.indexOf("state-failed") >= 0;
    function show() {
      if (!counter || left === null) { return; }
      var s = Math.max(0, left);
      counter.textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
    }
    function finish(cls, text) {
      done = true;
      device.className = device.className.replace(/state-\w+/, cls);
      state.textContent = text;
      var cancel = device.querySelector("[data-cancel]");
      if (cancel) { cancel.hidden = true; }
    }
    var tick = setInterval(function () {
      if (done) { clearInterval(tick); return; }
      left -= 1; show();
    }, 1000);
    var poll = setInterval(function () {
      if (done) { clearInterval(poll); return; }
      fetchOk(device.getAttribute("data-device")).then(function (r) { return r.json(); })
        .then(function (j) {
          if (j.state === "approved") {
            finish("state-approved", "\u2713 Approved. " + j.message + ".");
            var next = device.querySelector("[data-continue]");
            if (next) { next.textContent = "Continue to the account and its local passwords"; }
          } else if (j.state === "failed") {
            finish("state-failed", "\u2717 Not signed in: " + j.message);
          } else if (j.state === "waiting" && counter === null) {
            window.location.reload();  // the code arrived after this page was drawn
          } else if (typeof j.expires_in === "number") {
            left = Math.round(j.expires_in); show();
          }
        })
        .catch(function () {});
    }, 2000);
  }
})();
