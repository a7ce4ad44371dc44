// Re-fetch this page every data-refresh-ms and swap #content in: no flicker, the scroll
// position and open <details> stay. A failed fetch marks the page stale and tries again.
(function () {
  "use strict";
  function schedule() {
    var ms = parseInt(document.body.getAttribute("data-refresh-ms"), 10);
    if (ms > 0) { window.setTimeout(refresh, ms); }
  }
  function openDetails() {
    return Array.prototype.map.call(document.querySelectorAll("details[open][id]"),
                                    function (d) { return d.id; });
  }
  function refresh() {
    fetch(window.location.href, {cache: "no-store", credentials: "same-origin"})
      .then(function (reply) {
        if (!reply.ok) { throw new Error("HTTP " + reply.status); }
        return reply.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("content");
        if (!fresh) { throw new Error("no content"); }
        var open = openDetails();
        document.getElementById("content").replaceWith(document.adoptNode(fresh));
        open.forEach(function (id) {
          var d = document.getElementById(id);
          if (d) { d.open = true; }
        });
        document.body.setAttribute("data-refresh-ms", doc.body.getAttribute("data-refresh-ms"));
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); })
      .then(schedule);
  }
  schedule();
})();
