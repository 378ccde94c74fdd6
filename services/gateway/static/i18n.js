// zapbus pages in English and Brazilian Portuguese. The server picks by Accept-Language
// (<html lang>); a choice made with the switch is kept in this browser and wins.
"use strict";

const I18N = (() => {
  const STRINGS = {
    en: {
      title: "zapbus — WhatsApp connections",
      tagline: "WhatsApp connections",
      language: "Language",
      apiKey: "API key",
      useKey: "Use key",
      connections: "Connections",
      newConnection: "New connection",
      thName: "Name",
      thStatus: "Status",
      thGeneration: "Generation",
      thUpdated: "Updated",
      empty: "No connections yet. Create one to get a QR code.",
      name: "Name",
      nameHelp: "A label for you; the phone number comes from the scan.",
      phone: "Phone number (optional)",
      phoneHelp: "Given: link by typing a code on that phone instead of scanning a QR.",
      cancel: "Cancel",
      create: "Create",
      scanTitle: "Scan with WhatsApp",
      scanHelp: "On your phone: WhatsApp → Linked devices → Link a device.",
      qrAlt: "QR code to link WhatsApp",
      pairingCode: "pairing code",
      codeStep1: "On the phone, open WhatsApp → Linked devices → Link a device.",
      codeStep2: "Tap “Link with phone number instead”.",
      codeStep3: "Type this code.",
      waitingQr: "Waiting for the QR code…",
      connected: "Connected",
      status: "Status",
      close: "Close",
      pasteKey: "Paste an API key above to see your connections.",
      keyRefused: "That API key was not accepted.",
      couldNotLoad: "Could not load: {msg}",
      couldNotRecreate: "Could not recreate: {msg}",
      couldNotDelete: "Could not delete: {msg}",
      couldNotCreate: "Could not create: {msg}",
      btnQr: "QR / status",
      btnRecreate: "Recreate",
      btnDelete: "Delete",
      confirmDelete: "Delete {name}?",
      linkWithCode: "Link with a code",
      linked: "WhatsApp linked",
      qrSeq: "code {seq} · refreshes by itself",
      connectTitle: "Link your WhatsApp",
      connectStep1: "Open WhatsApp on your phone.",
      connectStep2: "Go to Settings → Linked devices → Link a device.",
      connectStep3: "Point the phone at this QR code.",
      connectWaiting: "Preparing your code…",
      connectDoneTitle: "WhatsApp connected",
      connectDoneText: "Your WhatsApp is linked. You can close this page.",
      connectExpired: "This link has expired. Ask for a new one.",
      connectInvalid: "This link is not valid. Check that it was copied whole.",
      connectEnded: "This connection ended ({state}).",
      connectRefresh: "The code changes by itself every few seconds; scan the one you see.",
    },
    "pt-BR": {
      title: "zapbus — conexões de WhatsApp",
      tagline: "Conexões de WhatsApp",
      language: "Idioma",
      apiKey: "Chave de API",
      useKey: "Usar chave",
      connections: "Conexões",
      newConnection: "Nova conexão",
      thName: "Nome",
      thStatus: "Status",
      thGeneration: "Geração",
      thUpdated: "Atualizada",
      empty: "Nenhuma conexão ainda. Crie uma para receber um QR code.",
      name: "Nome",
      nameHelp: "Um rótulo para você; o número vem da leitura do QR code.",
      phone: "Número de telefone (opcional)",
      phoneHelp: "Se informado: conecte digitando um código nesse celular em vez de ler um QR code.",
      cancel: "Cancelar",
      create: "Criar",
      scanTitle: "Leia com o WhatsApp",
      scanHelp: "No celular: WhatsApp → Dispositivos conectados → Conectar dispositivo.",
      qrAlt: "QR code para conectar o WhatsApp",
      pairingCode: "código de pareamento",
      codeStep1: "No celular, abra WhatsApp → Dispositivos conectados → Conectar dispositivo.",
      codeStep2: "Toque em “Conectar com número de telefone”.",
      codeStep3: "Digite este código.",
      waitingQr: "Aguardando o QR code…",
      connected: "Conectado",
      status: "Status",
      close: "Fechar",
      pasteKey: "Cole uma chave de API acima para ver suas conexões.",
      keyRefused: "Essa chave de API não foi aceita.",
      couldNotLoad: "Não foi possível carregar: {msg}",
      couldNotRecreate: "Não foi possível recriar: {msg}",
      couldNotDelete: "Não foi possível excluir: {msg}",
      couldNotCreate: "Não foi possível criar: {msg}",
      btnQr: "QR / status",
      btnRecreate: "Recriar",
      btnDelete: "Excluir",
      confirmDelete: "Excluir {name}?",
      linkWithCode: "Conectar com código",
      linked: "WhatsApp conectado",
      qrSeq: "código {seq} · atualiza sozinho",
      connectTitle: "Conecte seu WhatsApp",
      connectStep1: "Abra o WhatsApp no celular.",
      connectStep2: "Vá em Configurações → Dispositivos conectados → Conectar dispositivo.",
      connectStep3: "Aponte o celular para este QR code.",
      connectWaiting: "Preparando seu código…",
      connectDoneTitle: "WhatsApp conectado",
      connectDoneText: "Seu WhatsApp está conectado. Você já pode fechar esta página.",
      connectExpired: "Este link expirou. Peça um novo.",
      connectInvalid: "Este link não é válido. Confira se ele foi copiado inteiro.",
      connectEnded: "Esta conexão foi encerrada ({state}).",
      connectRefresh: "O código muda sozinho a cada poucos segundos; leia o que estiver na tela.",
    },
  };

  // proto/states.py
  const STATES = {
    "pt-BR": {
      pending: "na fila",
      creating: "criando",
      awaiting_qr: "aguardando QR code",
      qr_ready: "QR code pronto",
      code_ready: "código pronto",
      pairing: "pareando",
      connected: "conectado",
      reconnecting: "reconectando",
      qr_expired: "QR code expirado",
      logged_out: "desconectado",
      conflict: "conflito",
      failed: "falhou",
      deleted: "excluída",
    },
  };

  // services/projector/transitions.py REASON_CODES
  const REASONS = {
    en: {
      qr_refs_ended: "Nobody scanned the QR code in time.",
      logged_out: "The phone logged this device out.",
      conflict_loop: "The server kept reconnecting in a loop and gave up.",
      wrong_number: "The phone that linked is not the number asked for.",
      passkey_required: "WhatsApp asked for a passkey, which cannot be used here.",
      gave_up: "The session could not be created, after several tries.",
      timeout: "Nothing happened in time.",
      session_lost: "The WhatsApp server lost the session.",
      bad_credentials: "The WhatsApp server refused zapbus's key.",
      server_refused: "The WhatsApp server refused the request.",
      whatsapp_unreachable: "The server cannot reach WhatsApp.",
      connection_replaced: "Another device keeps taking over this session.",
    },
    "pt-BR": {
      qr_refs_ended: "Ninguém leu o QR code a tempo.",
      logged_out: "O celular desconectou este aparelho.",
      conflict_loop: "O servidor ficou reconectando em loop e desistiu.",
      wrong_number: "O celular que conectou não é o do número pedido.",
      passkey_required: "O WhatsApp pediu uma chave de acesso (passkey), que não funciona aqui.",
      gave_up: "Não foi possível criar a sessão, mesmo após várias tentativas.",
      timeout: "Nada aconteceu dentro do prazo.",
      session_lost: "O servidor do WhatsApp perdeu a sessão.",
      bad_credentials: "O servidor do WhatsApp recusou a chave do zapbus.",
      server_refused: "O servidor do WhatsApp recusou o pedido.",
      whatsapp_unreachable: "O servidor não consegue falar com o WhatsApp.",
      connection_replaced: "Outro aparelho fica tomando esta sessão.",
    },
  };

  const STORE = "zapbus.lang";
  const listeners = [];
  const known = (l) => Object.prototype.hasOwnProperty.call(STRINGS, l);
  let saved = null;
  try {
    saved = localStorage.getItem(STORE);
  } catch (err) {
    saved = null;
  }
  let lang = known(saved) ? saved : known(document.documentElement.lang) ? document.documentElement.lang : "en";

  function t(key, vars) {
    let text = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
    for (const [name, value] of Object.entries(vars || {})) text = text.replaceAll(`{${name}}`, value);
    return text;
  }

  // A state's label: English is the state's own name, spaced.
  const state = (status) => (STATES[lang] || {})[status] || String(status).replaceAll("_", " ");

  // Why: the translated reason_code where there is one, else the server's own words.
  const reason = (c) => (c.reason_code && REASONS[lang][c.reason_code]) || c.status_reason || "";

  function apply(root) {
    const scope = root || document;
    document.documentElement.lang = lang;
    for (const el of scope.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    for (const el of scope.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
    for (const el of scope.querySelectorAll("[data-i18n-alt]")) el.alt = t(el.dataset.i18nAlt);
    for (const el of scope.querySelectorAll("[data-i18n-label]")) el.setAttribute("aria-label", t(el.dataset.i18nLabel));
    for (const el of scope.querySelectorAll("select.lang-switch")) el.value = lang;
  }

  function set(next) {
    if (!known(next) || next === lang) return;
    lang = next;
    try {
      localStorage.setItem(STORE, lang);
    } catch (err) {
      // private mode: the choice lasts for this page only
    }
    apply();
    for (const fn of listeners) fn(lang);
  }

  // The <select class="lang-switch"> of a page.
  for (const el of document.querySelectorAll("select.lang-switch")) {
    el.addEventListener("change", () => set(el.value));
  }
  apply();

  return {
    t,
    state,
    reason,
    apply,
    set,
    onChange: (fn) => listeners.push(fn),
    get lang() {
      return lang;
    },
  };
})();
