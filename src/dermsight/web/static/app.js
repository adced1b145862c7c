// dermsight: progressive enhancement only. Without this file the form posts and the result page renders the same.
(function () {
  "use strict";
  document.documentElement.classList.add("js");
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("upload-form");
    if (!form) return;
    var picker = document.getElementById("image");
    var camera = document.getElementById("camera");
    var zone = document.getElementById("dropzone");
    var figure = document.getElementById("preview-figure");
    var preview = document.getElementById("preview");
    var caption = document.getElementById("preview-caption");
    var error = document.getElementById("form-error");
    var busy = document.getElementById("busy");
    var submit = document.getElementById("submit");
    var types = picker.accept.split(",");
    var previewUrl = null;

    function chosen() {
      return (picker.files && picker.files[0]) || (camera && camera.files && camera.files[0]) || null;
    }
    function showError(message) {
      error.textContent = message;
      error.hidden = !message;
    }
    function show(file) {
      showError("");
      if (previewUrl) URL.revokeObjectURL(previewUrl);
      previewUrl = null;
      if (!file) { figure.hidden = true; return; }
      if (file.type && types.indexOf(file.type) < 0) {
        // Only a hint: the server checks the bytes and explains properly.
        showError("This does not look like a JPEG, PNG, WebP, BMP or TIFF photo.");
      }
      caption.textContent = Math.max(1, Math.round(file.size / 1024)) + " KB";
      preview.hidden = false;
      if (file.type && file.type.indexOf("image/") === 0) {
        previewUrl = URL.createObjectURL(file);
        preview.src = previewUrl;
        figure.hidden = false;
      } else {
        figure.hidden = true;
      }
    }
    // Browsers cannot show every format the server reads (TIFF in most, HEIC anywhere but Safari): say so instead
    // of a broken-image icon.
    preview.addEventListener("error", function () {
      if (!previewUrl) return;
      preview.hidden = true;
      caption.textContent += ": no preview in this browser. If it is a TIFF photo you can still send it.";
    });
    picker.addEventListener("change", function () {
      if (camera) camera.value = "";
      show(chosen());
    });
    if (camera) camera.addEventListener("change", function () {
      picker.value = "";
      show(chosen());
    });

    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (e) { e.preventDefault(); zone.classList.add("dragover"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function (e) { e.preventDefault(); zone.classList.remove("dragover"); });
    });
    zone.addEventListener("drop", function (e) {
      var files = e.dataTransfer && e.dataTransfer.files;
      if (!files || !files.length) return;
      var dt = new DataTransfer();
      dt.items.add(files[0]);
      picker.files = dt.files;
      if (camera) camera.value = "";
      show(files[0]);
    });

    var maxBytes = parseInt(form.getAttribute("data-max-bytes"), 10) || 0;
    form.addEventListener("submit", function (e) {
      var file = chosen();
      if (!file) {
        e.preventDefault();
        showError("Please choose a photo first.");
        picker.focus();
        return;
      }
      if (maxBytes && file.size > maxBytes) {
        // Saves uploading megabytes only to be told so; the server enforces the same limit.
        e.preventDefault();
        showError("This file is larger than the " + form.getAttribute("data-max-text") +
                  " limit. Please choose a smaller photo.");
        return;
      }
      submit.disabled = true;
      submit.textContent = "Checking…";
      busy.textContent = "Analysing your photo. This usually takes a few seconds.";
    });
    // Coming back with the browser's back button must not leave the button disabled.
    window.addEventListener("pageshow", function () {
      submit.disabled = false;
      submit.textContent = "Check this spot";
      busy.textContent = "";
    });
  });
})();
