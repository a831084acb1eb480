// Keyboard shortcuts of the annotate pages; the forms work without them.
//   score: a digit picks the score (0 is 10 on a scale without 0); Enter submits.
//   rank:  letters order the responses best first, = ties the next letter with the one
//          before, Backspace takes the last one back; Enter submits.
//   label: digits 1-9 tick or untick a label; Enter submits.
//   s skips, u undoes your last answer, / writes a comment (Escape leaves it). (A ranking
//   of 19 or more responses has S and U among its letters: use the buttons there.)
(function () {
  "use strict";
  var body = document.body;
  var task = body.getAttribute("data-task");

  function send(id) {
    var form = document.getElementById(id);
    // The prototype's submit: a control named or id'd "submit" would shadow form.submit.
    if (form) { HTMLFormElement.prototype.submit.call(form); return true; }
    return false;
  }

  function note(text) {
    var message = document.getElementById("message");
    if (message) { message.textContent = text; }
  }

  function pickScore(key) {
    var box = document.getElementById("score-" + key) || (key === "0" ? document.getElementById("score-10") : null);
    if (!box) { return false; }
    box.checked = true;
    return true;
  }

  function orderKey(key) {
    var field = document.getElementById("ranking");
    if (!field) { return false; }
    var letters = body.getAttribute("data-letters") || "";
    var typed = field.value;
    var upper = key.length === 1 ? key.toUpperCase() : key;
    if (key === "=") {
      if (typed.length > 0 && typed.slice(-1) !== "=") { field.value = typed + "="; }
      return true;
    }
    if (key === "Backspace") {
      field.value = typed.slice(0, -1);
      return true;
    }
    if (upper.length === 1 && letters.indexOf(upper) >= 0) {
      if (typed.indexOf(upper) < 0) { field.value = typed + upper; } else { note(upper + " is placed already"); }
      return true;
    }
    return false;
  }

  function toggleLabel(key) {
    var box = document.getElementById("label-" + key);
    if (!box) { return false; }
    box.checked = !box.checked;
    return true;
  }

  function complete() {
    if (task === "score" && !document.querySelector("input[name=score]:checked")) {
      note("Pick a score first (type a digit).");
      return false;
    }
    if (task === "rank") {
      var placed = document.getElementById("ranking").value.replace(/=/g, "");
      var letters = body.getAttribute("data-letters") || "";
      if (placed.length !== letters.length || /=$/.test(document.getElementById("ranking").value)) {
        note("Place every response: type all of " + letters + ", best first.");
        return false;
      }
    }
    return true;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var target = event.target;
    var typing = target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && (target.type === "text" || target.type === "password") && !target.readOnly));
    if (typing) {
      if (event.key === "Escape") { target.blur(); event.preventDefault(); }
      return;
    }
    var key = event.key;
    var handled = false;
    if (!document.getElementById("answer")) {
      if (key === "u") { handled = send("undo-form"); }
    } else if (task === "rank" && orderKey(key)) {
      handled = true;
    } else if (/^[0-9]$/.test(key) && task === "score") {
      handled = pickScore(key);
    } else if (/^[1-9]$/.test(key) && task === "label") {
      handled = toggleLabel(key);
    } else if (key === "Enter") {
      handled = true;
      if (complete()) { send("answer"); }
    } else if (key === "s") {
      handled = send("skip-form");
    } else if (key === "u") {
      handled = send("undo-form");
    } else if (key === "/") {
      var comment = document.getElementById("comment");
      if (comment) { comment.focus(); handled = true; }
    }
    if (handled) { event.preventDefault(); }
  });
})();
